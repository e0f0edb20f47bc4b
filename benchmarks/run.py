"""Run the benchmark suite and print its tables; the full mode also writes them to benchmarks/results/.

    python -m benchmarks.run --quick      # CI smoke run, under 2 minutes on 2 CPU cores
    python -m benchmarks.run              # full run (about 10-15 minutes on 2 CPU cores)

Written: <out>.md and <out>.json (the tables), and <out>.png, the speed-ups as a chart (benchmarks/plot.py, which
also draws it from a results file written earlier: python -m benchmarks.plot benchmarks/results/NAME.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from benchmarks import cases, plot  # noqa: E402
from benchmarks.harness import Settings, load_average, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

FULL = cases.Plan(batch=32, train_batch=32, scaling=True, compile=True, memory=True,
                  model_names=("deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "caformer_s18",
                               "poolformer_s12", "schemeformer_ppaa_s12_224"))
QUICK = cases.Plan(batch=8, train_batch=8, scaling=False, compile=False, memory=False,
                   model_names=("deit_tiny_patch16_224",), adapted_models=("levit_128s",))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and few rounds (CI smoke run)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per comparison")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or process CPU time (steadier on a shared, busy machine)")
    parser.add_argument("--only", nargs="*", default=None,
                        choices=("kernels", "block", "shuffle", "models", "train", "compile", "scaling",
                                 "quantized", "adapted"),
                        help="run only these sections")
    parser.add_argument("--out", default=None,
                        help="write <out>.md and <out>.json (default for the full run: benchmarks/results/"
                             "<device>-full)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    plan = QUICK if args.quick else FULL
    settings = Settings(rounds=args.rounds or (3 if args.quick else 7), sample_seconds=0.05 if args.quick else 0.3,
                        clock=args.clock)
    sections = {
        "kernels": lambda: [cases.kernel_table(plan, settings)],
        "block": lambda: cases.block_tables(plan, settings),
        "shuffle": lambda: [cases.shuffle_table(plan, settings)],
        "models": lambda: [cases.model_table(plan, settings)],
        "train": lambda: [cases.train_table(plan, settings)],
        "compile": lambda: [cases.compile_amp_table(plan, settings)] if plan.compile else [],
        "scaling": lambda: cases.scaling_tables(plan, settings) if plan.scaling else [],
        "quantized": lambda: [cases.quantized_table(plan, settings)],
        "adapted": lambda: [cases.adapted_table(plan, settings)],
    }
    chosen = args.only or list(sections)

    info = machine()
    started = datetime.datetime.now().astimezone()
    header = [f"# timm-scheme benchmarks ({'quick' if args.quick else 'full'} run)", "",
              f"- date: {started:%Y-%m-%d %H:%M %Z}",
              *(f"- {k}: {v}" for k, v in info.items()),
              f"- clock: {args.clock}; {settings.rounds} interleaved rounds per comparison, medians; "
              "ratios are medians of per-round ratios",
              f"- load average at start: {load_average()}", ""]
    print("\n".join(header), flush=True)
    out = args.out or (None if args.quick else str(RESULTS / f"{info.get('cuda_device') and 'cuda' or 'cpu'}-full"))
    tables = []
    t0 = time.perf_counter()
    for name in chosen:
        load_before, section_start = load_average(), time.perf_counter()
        produced = sections[name]()
        for table in produced:
            table.notes.append(f"load average (1, 5, 15 min) before: {load_before}, after: {load_average()}; "
                               f"section took {time.perf_counter() - section_start:.0f} s")
            tables.append(table)
            print(table.markdown(), flush=True)
        _write(out, header, tables, "- (run in progress)", info, args, settings, time.perf_counter() - t0, started)
    elapsed = time.perf_counter() - t0
    footer = f"- load average at end: {load_average()}; benchmark time {elapsed:.0f} s"
    print(footer)
    _write(out, header, tables, footer, info, args, settings, elapsed, started)
    if out:
        print(f"wrote {out}.md and {out}.json")
        _chart(out)
    return 0


def _chart(out: str) -> None:
    """The speed-ups of the run just written as a chart, <out>.png (said why not, where it cannot be drawn)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"matplotlib is not installed: no chart written to {out}.png")
        return
    try:
        print(f"wrote {plot.plot_speedups(json.loads(Path(out + '.json').read_text()), Path(out + '.png'))}")
    except ValueError as error:  # e.g. only sections without a ratio to the reference were run
        print(f"no chart written to {out}.png: {error}")


def _write(out, header, tables, footer, info, args, settings, elapsed, started) -> None:
    """Write the tables so far (after every section, so an interrupted run keeps what it measured)."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out + ".md").write_text("\n".join(header) + "\n" + "\n".join(t.markdown() for t in tables) + "\n"
                                     + footer + "\n")
        Path(out + ".json").write_text(json.dumps({
            "mode": "quick" if args.quick else "full", "date": started.isoformat(), "machine": info,
            "clock": args.clock, "rounds": settings.rounds, "seconds": elapsed,
            "tables": [t.to_dict() for t in tables]}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
