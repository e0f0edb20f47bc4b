"""timm's own model test suite on the SCHEMEformer models this package registers: timm's ``tests/test_models.py``
from a checkout of timm's repository, run against the installed timm with ``import timm_scheme`` first and
``-k schemeformer``, as a user's CI would run it (from a folder other than the checkout, so that the installed timm
is the one imported; the command of ``tests/test_fx_bit_exact.py``'s docstring), once per thread count given.

    python examples/timm_model_tests.py --timm-dir PATH/TO/pytorch-image-models [--threads 1 2 2]
    # writes examples/results/timm_model_tests.{md,json}

The test files are read from the checkout, never copied here. (This package's own run of the same checks on
patched timm models, fused and unfused, is ``tests/test_timm_model_checks.py``.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import load_average, machine, write_results  # noqa: E402

RESULTS = ROOT / "examples" / "results" / "timm_model_tests"
RUNNER = "import timm_scheme, sys, pytest; sys.exit(pytest.main(sys.argv[1:]))"


def git_commit(path: Path) -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_once(test_file: Path, select: str, threads: int) -> Dict:
    """One pytest run in a fresh folder with ``threads`` torch threads; outcomes read from its JUnit XML."""
    with tempfile.TemporaryDirectory(prefix="timm-model-tests-") as work:
        report = Path(work) / "junit.xml"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        start, load = time.perf_counter(), load_average()
        proc = subprocess.run([sys.executable, "-c", RUNNER, str(test_file), "-k", select, "-q",
                               "-p", "no:cacheprovider", f"--junitxml={report}"],
                              cwd=work, env=env, capture_output=True, text=True)
        outcomes: Dict[str, str] = {}
        if report.is_file():
            for case in ET.parse(report).getroot().iter("testcase"):
                kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
                outcomes[case.get("name")] = kind
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failure", "error", "skipped")}
    return {"threads": threads, "exit_code": proc.returncode, "tests": len(outcomes), **counts,
            "not_passed": sorted(n for n, v in outcomes.items() if v != "passed"),
            "wall_time_s": round(time.perf_counter() - start, 1),
            "load_average": {"start": load, "end": load_average()},
            "summary_line": (proc.stdout.strip().splitlines() or [""])[-1]}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-dir", type=Path, required=True, help="checkout of timm's repository")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="one run per entry, in this order")
    parser.add_argument("-k", dest="select", default="schemeformer", help="pytest -k expression")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    test_file = (args.timm_dir / "tests" / "test_models.py").resolve()
    if not test_file.is_file():
        parser.error(f"--timm-dir {args.timm_dir} has no tests/test_models.py; point it at a checkout of timm's "
                     "repository")
    runs = []
    for threads in args.threads:
        runs.append(run_once(test_file, args.select, threads))
        print(json.dumps(runs[-1]), flush=True)
    info = machine()
    info["threads"] = ", ".join(str(t) for t in args.threads)  # per run, set through OMP_NUM_THREADS
    data = {"command": " ".join(["python examples/timm_model_tests.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "timm_tests": {"file": "tests/test_models.py", "commit": git_commit(args.timm_dir), "select": args.select},
            "machine": info, "runs": runs}
    lines = ["# timm's own model tests on the SCHEMEformer models (measured)", "",
             f"`{data['command']}` on {info['cpu']}, torch {info['torch']}, timm {info['timm']} (installed); "
             f"timm's `tests/test_models.py` at commit {data['timm_tests']['commit']}, `-k {args.select}`, "
             "`import timm_scheme` first.", "",
             "| run | threads | tests | passed | failed | errors | skipped | minutes | load average (start / end) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | {r['threads']} | {r['tests']} | {r['passed']} | {r['failure']} | {r['error']} | "
                     f"{r['skipped']} | {r['wall_time_s'] / 60:.1f} | {r['load_average']['start']} / "
                     f"{r['load_average']['end']} |")
    not_passed = sorted({n for r in runs for n in r["not_passed"]})
    if not_passed:
        lines += ["", "Not passed: " + ", ".join(not_passed)]
    text = "\n".join(lines) + "\n"
    write_results(args.out, data, text)
    return 0 if all(r["exit_code"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
