"""Converting a trained dense ViT to SCHEME without throwing its MLPs away (``init="dense"``), measured on
scikit-learn's digits.

For each seed: train a small dense ViT (the "pretrained" model), convert it to BD-MLP (g=4) at E=4 (same
width) and E=8 (extra units start silent) in four ways -- random init, the naive diagonal blocks in the
original unit order, ``init="dense"`` (weight energy) and ``init="dense"`` with calibration images -- and
measure accuracy and per-layer output error before training; then fine-tune each with CCA for the same
short budget (plus ``init="dense"`` with the dense model as teacher) and measure the fused accuracy.

    python examples/convert_pretrained.py            # full run, a few minutes on 2 CPU cores
    python examples/convert_pretrained.py --quick    # a smoke run (not the results)
    python examples/convert_pretrained.py --report-only

Writes dense_init.json and dense_init.md to --out (default examples/results/).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python examples/convert_pretrained.py`
from benchmarks.harness import machine  # noqa: E402
from timm_scheme import fuse_for_inference, scheme_mixers, scheme_patch
from timm_scheme.io.artifacts import staged_file
from timm_scheme.conversion import init_from_dense, layer_output_errors
from timm_scheme.patching.patch import find_mlps
from timm_scheme.training import random_batches, short_schedule, train_one_epoch
from timm_scheme.training.digits import load_digits_tensors
from timm_scheme.training.distill import Distiller

HERE = Path(__file__).resolve().parent
RESULTS = "dense_init"
# the small ViT of the digits reproduction: 16x16 digits, 4x4 patches -> 16 tokens
MODEL = dict(model_name="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=2,
             num_classes=10)
GROUPS = 4
CALIBRATION_IMAGES = 256
# every conversion starts CCA at the same weight, init="dense"'s default: only the MLP weights differ
ALPHA_INIT = 0.9
CONVERSIONS = {
    "random": "random init (the dense MLPs thrown away)",
    "diagonal": "naive: diagonal blocks, units in their original order",
    "dense": 'init="dense": units assigned to keep the most weight energy',
    "diagonal_refit": f"naive diagonal blocks, fc2 refit on {CALIBRATION_IMAGES} calibration images",
    "dense_calibrated": f'init="dense", calibration_data={CALIBRATION_IMAGES} images: units assigned by layer '
                        "output error, fc2 refit",
}
# fine-tuned again with the dense model as teacher (its logits, temperature 2)
DISTILLED = "+distill"
DISTILLED_FROM = ("dense", "dense_calibrated")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--expansions", type=float, nargs="+", default=[4.0, 8.0])
    parser.add_argument("--teacher-steps", type=int, default=800)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--teacher-lr", type=float, default=2e-3)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--alpha-init", type=float, default=ALPHA_INIT,
                        help="initial BD-MLP weight of every conversion (0.5 shows why init='dense' defaults to 0.9)")
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps: a smoke run, not the results")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table from the JSON")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.teacher_steps, args.finetune_steps, args.expansions = 1, 60, 10, [8.0]
    return args


def build_dense(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = dict(MODEL)
    return timm.create_model(kwargs.pop("model_name"), pretrained=False, **kwargs)


def convert(dense: torch.nn.Module, kind: str, expansion: float, calibration: torch.Tensor,
            alpha_init: float = ALPHA_INIT, anneal_steps: int = 100) -> torch.nn.Module:
    """One conversion of the trained dense model; the dense model is left as it is. CCA is annealed out over
    the second half of the ``anneal_steps`` optimizer steps of the fine-tune."""
    model = copy.deepcopy(dense)
    # the measurement of this example was taken with CCA (started at 1 - alpha_init, annealed over the fine-tune)
    options = dict(cca=True, alpha_init=alpha_init, cca_anneal_steps=anneal_steps, cca_anneal_start=0.5)
    if kind == "dense":
        return scheme_patch(model, GROUPS, expansion, init="dense", **options)
    if kind == "dense_calibrated":
        return scheme_patch(model, GROUPS, expansion, init="dense", calibration_data=calibration, **options)
    scheme_patch(model, GROUPS, expansion, **options)
    if kind.startswith("diagonal"):  # the naive baseline, by the same code with the assignment fixed
        originals = dict(find_mlps(dense))
        layers = [(name, originals[name], mixer) for name, mixer in scheme_mixers(model).items()]
        model.scheme_init_report = init_from_dense(
            dense, layers, GROUPS, calibration if kind == "diagonal_refit" else None, assignment="diagonal")
    return model


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float, batch_size: int,
          seed: int, distiller: Optional[Distiller] = None) -> None:
    """timm AdamW, warm-up + cosine, label smoothing 0.1, the project's one training loop (a SCHEME model anneals
    CCA by its own schedule); with a Distiller, its loss is added."""
    optimizer, scheduler = short_schedule(model, lr, steps)
    if distiller is None:
        forward, loss_fn = model, lambda logits, target: F.cross_entropy(logits, target, label_smoothing=0.1)
    else:
        forward = distiller
        loss_fn = lambda out, target: F.cross_entropy(out[0], target, label_smoothing=0.1) + out[1]  # noqa: E731
    train_one_epoch(model, random_batches(x, y, steps, batch_size, seed), optimizer, loss_fn, scheduler=scheduler,
                    forward=forward)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


def finetune_and_fuse(model, data, args, seed: int, distiller: Optional[Distiller] = None) -> float:
    x_train, y_train, x_test, y_test = data
    train(model, x_train, y_train, steps=args.finetune_steps, lr=args.finetune_lr, batch_size=args.batch_size,
          seed=seed + 1, distiller=distiller)
    if distiller is not None:
        distiller.remove()
    fuse_for_inference(model.eval())
    return accuracy(model, x_test, y_test)


def run_seed(seed: int, args: argparse.Namespace, log: Callable[[str], None]) -> Dict[str, Any]:
    data = load_digits_tensors(MODEL["img_size"], in_chans=3, seed=0)
    x_train, y_train, x_test, y_test = data
    dense = build_dense(seed)
    train(dense, x_train, y_train, steps=args.teacher_steps, lr=args.teacher_lr, batch_size=args.batch_size,
          seed=seed)
    result: Dict[str, Any] = {"seed": seed, "dense_top1": accuracy(dense, x_test, y_test), "expansions": {}}
    log(f"seed {seed}: dense top-1 {result['dense_top1']:.2%}")
    calibration = x_train[:CALIBRATION_IMAGES]
    for expansion in args.expansions:
        rows: Dict[str, Any] = {}
        for kind in CONVERSIONS:
            torch.manual_seed(seed)  # the same random fc1 rows for every conversion's new units
            model = convert(dense, kind, expansion, calibration, args.alpha_init, args.finetune_steps)
            errors = layer_output_errors(dense, model, x_test)
            report = getattr(model, "scheme_init_report", None)
            rows[kind] = {
                "step0_top1": accuracy(model, x_test, y_test),
                "layer_output_error": errors,
                "mean_layer_output_error": statistics.mean(errors.values()),
                "weight_energy_kept": None if report is None else statistics.mean(
                    v.retained_energy for v in report.layers.values()),
            }
            rows[kind]["finetuned_top1"] = finetune_and_fuse(model, data, args, seed)
            log(f"  E={expansion:g} {kind:17} step 0 {rows[kind]['step0_top1']:.2%}  "
                f"layer error {rows[kind]['mean_layer_output_error']:.3f}  "
                f"fine-tuned {rows[kind]['finetuned_top1']:.2%}")
        for kind in DISTILLED_FROM:
            torch.manual_seed(seed)
            student = convert(dense, kind, expansion, calibration, args.alpha_init, args.finetune_steps)
            distiller = Distiller(dense, student, temperature=2.0, logit_weight=1.0)
            rows[kind + DISTILLED] = {"finetuned_top1": finetune_and_fuse(student, data, args, seed, distiller)}
            log(f"  E={expansion:g} {kind + DISTILLED:17} fine-tuned {rows[kind + DISTILLED]['finetuned_top1']:.2%}")
        result["expansions"][f"{expansion:g}"] = rows
    return result


def write_report(data: Dict[str, Any], out: Path) -> str:
    runs = data["runs"]
    threads = int(data["machine"]["threads"])
    lines = [
        "# Converting a trained dense ViT with `init=\"dense\"` (digits, measured)",
        "",
        f"Generated by `{data['generated_by']}` on {data['machine']['cpu']} ({threads} "
        f"thread{'' if threads == 1 else 's'}), "
        f"torch {data['machine']['torch']}, timm {data['machine']['timm']}; {len(runs)} seeds, "
        f"{data['wall_time_s'] / 60:.1f} min. Mean (min-max) over seeds.",
        "",
        f"Model: timm `{MODEL['model_name']}` with embed_dim={MODEL['embed_dim']}, depth={MODEL['depth']}, "
        f"{MODEL['img_size']}px digits, {MODEL['patch_size']}px patches; dense E=4 trained "
        f"{data['args']['teacher_steps']} steps (lr {data['args']['teacher_lr']}), then converted to BD-MLP "
        f"g={GROUPS} and fine-tuned {data['args']['finetune_steps']} steps (lr {data['args']['finetune_lr']}) with "
        f"CCA (every conversion starts it at 1 - alpha = {1 - data['args'].get('alpha_init', ALPHA_INIT):.1f}) "
        "annealed out over the second half, "
        "then fused. Calibration images are training images; all accuracies are on the held-out test split.",
        "",
        f"Dense model top-1: {_spread([r['dense_top1'] for r in runs])}",
        "",
    ]
    for expansion in runs[0]["expansions"]:
        lines += [f"## g={GROUPS}, E={expansion}", "",
                  "| conversion | weight energy kept | mean layer output error | top-1 at step 0 | "
                  "top-1 after fine-tune (fused) |", "|---|---|---|---|---|"]
        labels = {**CONVERSIONS, **{k + DISTILLED: f"{k}, fine-tuned with the dense model as teacher (logits)"
                                      for k in DISTILLED_FROM}}
        for kind, label in labels.items():
            rows = [r["expansions"][expansion][kind] for r in runs]
            distilled = kind.endswith(DISTILLED)
            energy = "" if distilled or rows[0].get("weight_energy_kept") is None else \
                f"{statistics.mean(r['weight_energy_kept'] for r in rows):.3f}"
            error = "" if distilled else _spread([r["mean_layer_output_error"] for r in rows], pct=False)
            step0 = "" if distilled else _spread([r["step0_top1"] for r in rows])
            lines.append(f"| {label} | {energy} | {error} | {step0} | {_spread([r['finetuned_top1'] for r in rows])} |")
        lines.append("")
        first = runs[0]["expansions"][expansion]
        layers = list(first["dense"]["layer_output_error"])
        lines += [f"Per-layer relative output error at step 0 (seed {runs[0]['seed']}):", "",
                  "| layer | " + " | ".join(CONVERSIONS) + " |", "|---|" + "---|" * len(CONVERSIONS)]
        for layer in layers:
            lines.append(f"| {layer} | " + " | ".join(f"{first[k]['layer_output_error'][layer]:.3f}"
                                                      for k in CONVERSIONS) + " |")
        lines.append("")
    text = "\n".join(lines)
    (out / f"{RESULTS}.md").write_text(text)
    return text


def _spread(values: List[float], pct: bool = True) -> str:
    fmt = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:.3f}")
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.mean(values))} ({fmt(min(values))}-{fmt(max(values))})"


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{RESULTS}.json"
    if args.report_only:
        print(write_report(json.loads(path.read_text()), args.out))
        return
    start = time.perf_counter()
    runs = [run_seed(seed, args, lambda s: print(s, flush=True)) for seed in range(args.seeds)]
    data = {
        "generated_by": " ".join(["python examples/convert_pretrained.py", *sys.argv[1:]]),
        "machine": machine(),
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "report_only")},
        "wall_time_s": time.perf_counter() - start,
        "runs": runs,
    }
    if args.quick:
        path = args.out / f"{RESULTS}_quick.json"
    with staged_file(path) as partial:
        partial.write_text(json.dumps(data, indent=1))
    if not args.quick:
        print(write_report(data, args.out))


if __name__ == "__main__":
    main()
