"""How far a bf16 / fp16 autocast training step of a patched model is from float32 on CPU: the relative error
(norm) of the logits, of the mixers' fc1 / fc2 weight gradients, of the input gradient and of the mixing-logit
gradients. Exactly what ``tests/test_robustness.py::test_autocast_training_step_is_finite_and_close_to_float32``
bounds, on its models and batch (patched DeiT-Tiny and CAFormer-S18, one block per stage, CCA on, mixing logits
drawn away from their init), with its helpers.

    python examples/autocast_error.py      # writes examples/results/autocast_error.{md,json}
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import load_average, machine, write_results  # noqa: E402
from tests.scenarios import (AUTOCAST_TOLERANCE, batch, loss_and_grads, patched_shallow,  # noqa: E402
                             relative_error)

MODELS = ["deit_tiny_patch16_224", "caformer_s18"]  # the test's parametrization
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RESULTS = ROOT / "examples" / "results" / "autocast_error"


def measure(key: str, name: str) -> Dict:
    dtype = DTYPES[name]
    model = patched_shallow(key, keep=1)
    images, labels = batch(key)
    logits, _, grads = loss_and_grads(model, images, labels)
    with torch.autocast("cpu", dtype=dtype):
        logits_low, loss_low, grads_low = loss_and_grads(model, images, labels)
    weights = [n for n in grads if n.endswith(("fc1.weight", "fc2.weight"))]
    mixing = [n for n in grads if n.endswith("mix_logits")]
    finite = bool(torch.isfinite(logits_low).all() and torch.isfinite(loss_low)
                  and all(torch.isfinite(g).all() for g in grads_low.values()))
    return {"model": key, "autocast": name, "finite": finite,
            "logits": relative_error(logits_low, logits),
            "weight_grads": {n: relative_error(grads_low[n], grads[n]) for n in weights},
            "input_grad": relative_error(grads_low["input"], grads["input"]),
            "mixing_logit_grads": {n: relative_error(grads_low[n], grads[n]) for n in mixing},
            "test_bounds": dict(zip(("logits", "weight_and_input_grads", "mixing_logit_grads"),
                                    AUTOCAST_TOLERANCE[dtype]))}


def span(values: List[float]) -> str:
    low, high = f"{min(values):.2%}", f"{max(values):.2%}"
    return low if low == high else f"{low}-{high}"


def markdown(data: Dict) -> str:
    m = data["machine"]
    lines = ["# bf16 / fp16 autocast training step against float32, CPU (measured)", "",
             f"`{data['command']}` on {m['cpu']}, {m['threads']} thread, torch {m['torch']}, timm {m['timm']}; "
             f"load average {data['load_average']['start']} at the start, {data['load_average']['end']} at the end.",
             "", "Relative error (norm of the difference over the float32 norm); ranges over the mixers of the model. "
             "The test's bounds in brackets.", "",
             "| model | autocast | finite | logits | mixers' fc1 / fc2 weight gradients | input gradient | "
             "mixing-logit gradients |", "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        b = r["test_bounds"]
        lines.append(f"| {r['model']} | {r['autocast']} | {r['finite']} | {r['logits']:.2%} (< {b['logits']:.1%}) | "
                     f"{span(list(r['weight_grads'].values()))} (< {b['weight_and_input_grads']:.0%}) | "
                     f"{r['input_grad']:.2%} (< {b['weight_and_input_grads']:.0%}) | "
                     f"{span(list(r['mixing_logit_grads'].values()))} (< {b['mixing_logit_grads']:.0%}) |")
    lines.append("")
    for name in DTYPES:
        rows = [r for r in data["rows"] if r["autocast"] == name]
        lines.append(f"{name}, both models: logits {span([r['logits'] for r in rows])}, mixers' weight gradients "
                     f"{span([v for r in rows for v in r['weight_grads'].values()])}, input gradient "
                     f"{span([r['input_grad'] for r in rows])}, mixing-logit gradients "
                     f"{span([v for r in rows for v in r['mixing_logit_grads'].values()])}.")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = load_average()
    rows = [measure(key, name) for key in MODELS for name in DTYPES]
    data = {"command": " ".join(["python examples/autocast_error.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine(), "load_average": {"start": start, "end": load_average()}, "rows": rows}
    write_results(args.out, data, markdown(data))


if __name__ == "__main__":
    main()
