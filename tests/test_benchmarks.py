"""The benchmark suite runs end to end (its quick mode) and prints every table the performance targets need."""
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_quick_run_prints_every_section(tmp_path):
    # one round per comparison: every case still runs and every ratio is still measured, in half the time
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--threads", "1", "--rounds", "1",
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


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMMITTED = ROOT / "benchmarks" / "results" / "cpu-2026-11-24-1thread-cputime"


def made_up_run():
    nan = float("nan")
    return {"mode": "full", "date": "2026-01-01T00:00:00+00:00", "clock": "cpu",
            "machine": {"cpu": "a CPU", "threads": "1"},
            "tables": [
                {"title": "Block", "columns": ["kernel", "ms", "speedup vs dense E=4", "speedup vs grouped Conv2d"],
                 "rows": [["dense E=4", 10.0, 1.0, 3.0], ["ours", 6.0, 1.6, 4.8], ["not measured", nan, nan, nan]],
                 "notes": []},
                {"title": "Training", "columns": ["kernel", "ms", "time / dense E=4"],
                 "rows": [["dense E=4", 10.0, 1.0], ["ours + CCA", 12.5, 1.25]], "notes": []},
                {"title": "Attainable", "columns": ["what", "ms", "speedup vs timm dense E=4", "share of its total"],
                 "rows": [["g x one group", 7.0, 1.4, 1.0], ["parts: group fc1 addmm", 3.0, 3.3, 0.43]], "notes": []},
                {"title": "Scaling", "columns": ["image px", "batch", "tokens / image", "inference ratio (dense t / "
                                                 "SCHEME t)"], "rows": [[224, 8, 197, 1.1]], "notes": []},
                {"title": "Per token", "columns": ["part", "batch", "us / token"], "rows": [["CCA", 8, 1.2]],
                 "notes": []}]}


def test_speedup_chart_shows_one_bar_per_comparison_faster_above_one(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    run = made_up_run()
    tables = {t["title"]: plot.speedups(t) for t in run["tables"]}
    assert tables["Block"] == ("speedup vs dense E=4", [("dense E=4", 1.0), ("ours", 1.6)])  # no figure: no bar
    # a time ratio is shown inverted, so that above 1 means faster in every panel
    assert tables["Training"] == ("1 / (time / dense E=4)", [("dense E=4", 1.0), ("ours + CCA", 0.8)])
    assert tables["Attainable"][1] == [("g x one group", 1.4)]  # one op of a whole is no comparison
    assert tables["Scaling"][1] == [("224 px, batch 8", 1.1)]
    assert tables["Per token"] is None  # no ratio to a reference
    path = plot.plot_speedups(run, tmp_path / "run.png")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    with pytest.raises(ValueError, match="no table with a speed-up"):
        plot.plot_speedups(dict(run, tables=run["tables"][-1:]), tmp_path / "none.png")
    with pytest.raises(ValueError, match="no table with a speed-up"):
        plot.plot_speedups({"tables": []}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_a_results_table_read_back_from_markdown_gives_the_json_figures_as_printed(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    parsed = plot.parse_markdown(COMMITTED.with_suffix(".md").read_text())
    written = json.loads(COMMITTED.with_suffix(".json").read_text())
    assert (parsed["mode"], parsed["clock"], parsed["machine"]["threads"]) == ("full", "cpu", "1")
    assert [t["title"] for t in parsed["tables"]] == [t["title"] for t in written["tables"]]
    for md, js in zip(parsed["tables"], written["tables"]):
        assert md["columns"] == js["columns"] and len(md["rows"]) == len(js["rows"])
        for md_row, js_row in zip(md["rows"], js["rows"]):
            for a, b in zip(md_row, js_row):
                if isinstance(b, float):
                    assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=6e-3), (md_row, js_row)
                else:
                    assert a == b
        if plot.speedups(js):
            assert [label for label, _ in plot.speedups(md)[1]] == [label for label, _ in plot.speedups(js)[1]]
    # the command draws a results .md on its own (no .json beside it) next to it
    shutil.copy(COMMITTED.with_suffix(".md"), tmp_path / "run.md")
    assert plot.main([str(tmp_path / "run.md")]) == 0
    assert (tmp_path / "run.png").read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "missing.md")])


def test_the_benchmark_runner_draws_its_chart_next_to_its_tables(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from benchmarks import run

    (tmp_path / "quick.json").write_text(json.dumps(made_up_run()))
    run._chart(str(tmp_path / "quick"))
    assert (tmp_path / "quick.png").read_bytes().startswith(PNG_SIGNATURE)
    (tmp_path / "none.json").write_text(json.dumps({"tables": []}))
    run._chart(str(tmp_path / "none"))
    assert "no chart written to" in capsys.readouterr().out and not (tmp_path / "none.png").exists()


def test_the_readme_lists_and_describes_every_section_the_runner_accepts(capsys):
    from benchmarks import run

    with pytest.raises(SystemExit):
        run.main(["--only", "?"])  # argparse names the accepted sections in its usage line
    accepted = re.search(r"--only \[\{([\w,]+)\}", capsys.readouterr().err).group(1).split(",")
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    assert re.search(r"`--only ([\w ]+)`", readme).group(1).split() == accepted
    sections = readme.split("Sections (targets in brackets):")[1].split("\n## ")[0]
    described = re.findall(r"^- `(\w+)`:", sections, flags=re.M)
    assert described == accepted
