"""`timm-scheme train --init dense --initial-checkpoint` on a trained dense checkpoint: how much of its accuracy
the converted model keeps before any step, against random init. The measurement of
``tests/test_train.py::test_converting_a_trained_dense_checkpoint_keeps_its_accuracy``, recorded.

    python examples/init_dense_checkpoint.py                 # seed 0, the test's run
    python examples/init_dense_checkpoint.py --seeds 0 1 2   # and more seeds

Per seed: the test's tiny ViT (embed 32, depth 2, 16 px digits, 4 px patches) trained dense for 12 epochs
(`--no-scheme`, batch 32), then patched (g=4, E=8, CCA off) from its checkpoint with random mixers and with
``--init dense`` (calibrated on 256 training images), each run for one epoch at a learning rate too small to move
anything (1e-12): that epoch's top-1 is the converted model's own. Writes init_dense_checkpoint.json to --out
(default examples/results/).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `python examples/init_dense_checkpoint.py`
from benchmarks.harness import machine  # noqa: E402
from timm_scheme.io.artifacts import staged_file  # noqa: E402

RESULTS = "init_dense_checkpoint"
# tests/test_train.py's TINY model and run options
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2",
        "--img-size", "16", "--patch-size", "4", "--batch-size", "128", "--threads", "1", "--no-progress"]
DENSE = ["--epochs", "12", "--batch-size", "32", "--no-scheme", "--no-export"]
FROZEN = ["--epochs", "1", "--lr", "1e-12", "--warmup-epochs", "0", "--no-export"]
CONVERSIONS = {"random": [], "init_dense": ["--init", "dense"]}


def last_top1(out: Path) -> float:
    return json.loads((out / "log.json").read_text())["epochs"][-1]["top1"]


def measure_seed(seed: int, work: Path) -> dict:
    from timm_scheme.cli import main

    def train(name: str, *options: str) -> Path:
        out = work / f"{name}_s{seed}"
        if main(["train", *TINY, "--seed", str(seed), "--output", str(out), *options]) != 0:
            raise SystemExit(f"training {name} (seed {seed}) failed")
        return out

    dense = train("dense", *DENSE)
    row = {"seed": seed, "dense_top1": last_top1(dense)}
    for name, options in CONVERSIONS.items():
        row[f"{name}_top1"] = last_top1(train(name, *FROZEN, "--initial-checkpoint",
                                              str(dense / "checkpoint.pth"), *options))
    row["margin_init_dense_over_random"] = row["init_dense_top1"] - row["random_top1"]
    row["dense_minus_init_dense"] = row["dense_top1"] - row["init_dense_top1"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="default 0, the test's seed")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")  # fusing warns about what it drops; nothing here is deployed
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="init-dense-") as work:
        runs = [measure_seed(seed, Path(work)) for seed in args.seeds]
    keys = [k for k in runs[0] if k != "seed"]
    data = {
        "generated_by": " ".join(["python examples/init_dense_checkpoint.py", *(argv or sys.argv[1:])]),
        "measures": "tests/test_train.py::test_converting_a_trained_dense_checkpoint_keeps_its_accuracy",
        "dense_args": TINY + DENSE,
        "converted_args": TINY + FROZEN + ["--initial-checkpoint", "<dense>/checkpoint.pth"],
        "conversions": CONVERSIONS,
        "machine": {**machine(), "cpu_count": str(os.cpu_count()), "threads": "1"},  # every run: --threads 1
        "wall_time_s": round(time.perf_counter() - started, 1),
        "runs": runs,
        "mean": {k: statistics.mean(r[k] for r in runs) for k in keys},
    }
    with staged_file(args.out / f"{RESULTS}.json") as partial:  # an interrupted run keeps the last results whole
        partial.write_text(json.dumps(data, indent=1))
    for r in runs:
        print(f"seed {r['seed']}: dense {r['dense_top1']:.1f}%, converted before any step: init dense "
              f"{r['init_dense_top1']:.1f}%, random {r['random_top1']:.1f}% (margin "
              f"{r['margin_init_dense_over_random']:.1f} points)")
    print(f"written to {args.out / f'{RESULTS}.json'} ({data['wall_time_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
