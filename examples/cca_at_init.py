"""What each CCA form carries at initialisation, on real images: per family and image size, the branch's share of
each mixer's output, the attention it puts on channels of other groups, and its effective number of channels
(``timm_scheme.diagnostics.cca_diagnostics``), for every ``cca_form``.

    python examples/cca_at_init.py            # writes examples/results/cca_at_init.{md,json}

Models as the drop-in runs build them (``examples/drop_in/run_timm_train.py``), patched with ``groups=4,
expansion=8, cca=True`` and the form; 8 digits images, normalised with mean and std 0.5; one seed.
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn.functional as F

import timm_scheme
from timm_scheme.diagnostics import cca_diagnostics

HERE = Path(__file__).resolve().parent
MODELS: Dict[str, Tuple[Callable[[], torch.nn.Module], int]] = {
    "ViT (DeiT-Tiny, depth 4), 32 px, 65 tokens": (
        lambda: timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, num_classes=10), 32),
    "ViT (DeiT-Tiny, depth 4), 224 px, 197 tokens": (
        lambda: timm.create_model("deit_tiny_patch16_224", depth=4, num_classes=10), 224),
    "Swin (2 stages), 32 px, 256 / 64 tokens": (
        lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4,
                                  depths=(2, 2), num_heads=(3, 6), num_classes=10), 32),
    "CAFormer-S18, 32 px, 64 to 1 tokens": (lambda: timm.create_model("caformer_s18", num_classes=10), 32),
    "CAFormer-S18, 64 px, 256 to 4 tokens": (lambda: timm.create_model("caformer_s18", num_classes=10), 64),
}
FORMS = [("paper", "hidden"), ("authors", "hidden"), ("rescaled", "hidden"), ("output", "hidden"),
         ("output_cross", "hidden"), ("output_cross", "normalized")]


def digits(px: int, count: int = 8) -> torch.Tensor:
    from sklearn.datasets import load_digits
    images = torch.tensor(load_digits().images[:count], dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(px, px), mode="bilinear", align_corners=False).clamp(0, 1)
    return ((images - 0.5) / 0.5).repeat(1, 3, 1, 1)


def measure() -> List[Dict]:
    rows = []
    for name, (make, px) in MODELS.items():
        x = digits(px)
        for form, mode in FORMS:
            torch.manual_seed(0)
            model = timm_scheme.scheme_patch(make(), groups=4, expansion=8, cca=True, cca_form=form,
                                             cca_scale_mode=mode)
            report = cca_diagnostics(model, x, warn=False)
            values = {key: [getattr(d, key) for d in report.values()]
                      for key in ("cca_share", "cca_rms", "block_rms", "cross_group_mass", "effective_channels")}
            rows.append(dict(model=name, cca_form=form, cca_scale_mode=mode, layers=len(report), **values))
            print(f"{name} | {form} ({mode}): share {min(values['cca_share']):.2f}-{max(values['cca_share']):.2f}",
                  flush=True)
    return rows


def table(rows: List[Dict]) -> str:
    span = lambda v, f: f"{min(v):{f}}-{max(v):{f}}"  # noqa: E731
    lines = ["Each CCA form at initialisation (`python examples/cca_at_init.py`): over the mixers of a model, the range "
             "of the branch's share of the mixer's output (`(1 - alpha) CCA` against `alpha BD_MLP`, alpha = 0.5), "
             "of the branch's RMS over the block's, of the attention on other groups' channels (0.75 is uniform at "
             "groups=4) and of the effective number of channels a row attends to.", "",
             "| model | form (logit scale) | share of the output | branch RMS / block RMS | cross-group mass | "
             "effective channels |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = [c / b for c, b in zip(r["cca_rms"], r["block_rms"])]
        lines.append(f"| {r['model']} | {r['cca_form']} ({r['cca_scale_mode']}) | {span(r['cca_share'], '.2f')} | "
                     f"{span(ratio, '.2f')} | {span(r['cross_group_mass'], '.2f')} | "
                     f"{span(r['effective_channels'], '.0f')} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cca_at_init")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(1)
    rows = measure()
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    args.out.with_suffix(".md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
