"""The benchmark suite runs end to end (its quick mode) and prints every table the performance targets need."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_quick_run_prints_every_section(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--threads", "1",
                             "--out", str(tmp_path / "quick")], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "quick.md").read_text()
    # the quick mode leaves out the scaling and compile sections (minutes each); the full run has them
    for title in ("Block-diagonal linear vs dense GEMM", "BD-MLP block (g=4, E=8) vs dense MLP", "Attainable",
                  "BD-MLP block and CCA, training", "Whole model, inference", "Training step"):
        assert title in report, f"section {title!r} missing from the benchmark report"
    assert "nan" not in report.split("### Attainable")[0]  # every ratio of the first sections was measured


@pytest.mark.slow
def test_gpu_check_smoke_run_on_cpu(tmp_path):
    """The accelerator check, prepared for when a GPU is at hand, runs every section on the CPU (tiny sizes)."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--quick",
                             "--out", str(tmp_path / "check")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "check.md").read_text()
    for title in ("Correctness:", "BD-MLP (g=4, E=8, fused) vs timm's dense E=4 Mlp", "Whole model, inference",
                  "Training step"):
        assert title in report, title
    assert "FAIL" not in report and "| nan |" not in report
    for form in ("batched", "grouped_mm", "per_group"):  # every eager accelerator form was checked
        assert f"gated=True channel_shuffle, eval, {form}, float32 output without autograd" in report, form
    assert "Int8BlockDiagonalLinear, 16 rows, output" in report
