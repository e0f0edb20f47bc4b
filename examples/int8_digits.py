"""What int8 quantization costs a fused SCHEME model, by both routes (torch.ao's ``quantize_dynamic`` through
``quantize_dynamic_int8``, torchao's ``quantize_`` through ``quantize_int8``), over several seeds:

- digits: the tiny ViT of ``tests/test_quantize.py`` (trained with CCA annealed out, fused), top-1 on the 449
  held-out images in float32 and in int8, and the relative error of the int8 logits (norm) on those images;
- random weights: the 2-block DeiT-Tiny of the same tests on a random batch, the relative logit error with every
  projection quantized, and with the block-diagonal layers alone (``linear=False``).

    python examples/int8_digits.py      # writes examples/results/int8_digits.{md,json}

One thread; the training and the models are the tests' own (``tests/scenarios.py``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import load_average, machine, write_results  # noqa: E402
from tests.scenarios import HAS_TORCHAO, QUANTIZE_ENTRY_POINTS, fused_deit, train_digits  # noqa: E402

RESULTS = ROOT / "examples" / "results" / "int8_digits"


def routes() -> List[str]:
    return [e for e in QUANTIZE_ENTRY_POINTS if e != "torchao" or HAS_TORCHAO]


def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def digits_seed(seed: int) -> Dict:
    model, x_test, y_test = train_digits(seed=seed)  # trains: no no_grad here
    return _digits_row(seed, model, x_test, y_test)


@torch.no_grad()
def _digits_row(seed: int, model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor) -> Dict:
    logits = model(x_test)
    top1 = lambda out: float((out.argmax(-1) == y_test).float().mean()) * 100  # noqa: E731
    row = {"seed": seed, "images": len(y_test), "fp32_top1": top1(logits)}
    for entry in routes():
        out = QUANTIZE_ENTRY_POINTS[entry][0](model)(x_test)
        row[entry] = {"top1": top1(out), "top1_loss": row["fp32_top1"] - top1(out),
                      "images_lost": int((logits.argmax(-1) == y_test).sum() - (out.argmax(-1) == y_test).sum()),
                      "relative_logit_error": relative(out, logits)}
    return row


@torch.no_grad()
def random_seed(seed: int) -> Dict:
    torch.manual_seed(seed)
    model = fused_deit()
    x = torch.randn(8, 3, 32, 32)
    ref = model(x)
    row = {"seed": seed}
    for entry in routes():
        quantize = QUANTIZE_ENTRY_POINTS[entry][0]
        row[entry] = {"relative_logit_error": relative(quantize(model)(x), ref),
                      "block_diagonal_only": relative(quantize(model, linear=False)(x), ref)}
    return row


def span(values: List[float], fmt: str) -> str:
    low, high = min(values), max(values)
    if low == high:
        return f"{low:{fmt}}"
    return f"{low:{fmt}} to {high:{fmt}}" if "+" in fmt else f"{low:{fmt}}-{high:{fmt}}"


def markdown(data: Dict) -> str:
    m = data["machine"]
    digits, rand = data["digits"], data["random"]
    lines = ["# int8 quantization of a fused SCHEME model (measured)", "",
             f"`{data['command']}` on {m['cpu']}, {m['threads']} thread, torch {m['torch']}, timm {m['timm']}; load "
             f"average {data['load_average']['start']} at the start, {data['load_average']['end']} at the end; "
             f"{data['wall_time_s'] / 60:.1f} min.", "",
             f"## Digits: the tiny ViT of `tests/test_quantize.py`, trained, fused, quantized (seeds "
             f"{digits[0]['seed']}-{digits[-1]['seed']})", "",
             "| seed | fp32 top-1 % | " + " | ".join(f"{e}: top-1 %, points lost (images), logit error"
                                                 for e in data["routes"]) + " |",
             "|---|---|" + "---|" * len(data["routes"])]
    for r in digits:
        lines.append(f"| {r['seed']} | {r['fp32_top1']:.2f} | " + " | ".join(
            f"{r[e]['top1']:.2f}, {r[e]['top1_loss']:+.2f} ({r[e]['images_lost']:+d}), "
            f"{r[e]['relative_logit_error']:.2%}" for e in data["routes"]) + " |")
    lines += ["", f"fp32 top-1 {span([r['fp32_top1'] for r in digits], '.2f')}%."]
    for e in data["routes"]:
        lost = [r[e]["top1_loss"] for r in digits]
        images = max(r[e]["images_lost"] for r in digits)
        lines.append(f"{e}: top-1 points lost {span(lost, '+.2f')} (largest {max(lost):.2f}, {images} of "
                     f"{digits[0]['images']} images), relative logit error "
                     f"{span([r[e]['relative_logit_error'] for r in digits], '.2%')}.")
    lines += ["", f"## Random weights: the 2-block DeiT-Tiny of `tests/test_quantize.py`, batch 8 (seeds "
                  f"{rand[0]['seed']}-{rand[-1]['seed']})", "",
              "| route | relative logit error, every projection int8 | block-diagonal layers alone int8 |",
              "|---|---|---|"]
    for e in data["routes"]:
        lines.append(f"| {e} | {span([r[e]['relative_logit_error'] for r in rand], '.2%')} | "
                     f"{span([r[e]['block_diagonal_only'] for r in rand], '.2%')} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    args = parser.parse_args(argv)
    if args.report_only:
        text = markdown(json.loads(args.out.with_suffix(".json").read_text()))
        args.out.with_suffix(".md").write_text(text)
        print(text)
        return
    warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice on every call
    torch.set_num_threads(1)
    start, load = time.perf_counter(), load_average()
    digits, rand = [], []
    for seed in range(args.seeds):
        digits.append(digits_seed(seed))
        rand.append(random_seed(seed))
        print(json.dumps(digits[-1]), json.dumps(rand[-1]), sep="\n", flush=True)
    data = {"command": " ".join(["python examples/int8_digits.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine(), "load_average": {"start": load, "end": load_average()},
            "wall_time_s": time.perf_counter() - start, "routes": routes(), "digits": digits, "random": rand}
    write_results(args.out, data, markdown(data))


if __name__ == "__main__":
    main()
