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
