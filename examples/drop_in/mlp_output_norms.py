"""How loud each block's MLP is in trained models: the mean L2 norm over tokens of every ``*.mlp`` module's input
and output, on validation images preprocessed as the training run evaluated them.

Compares train.py checkpoints of the same model trained dense and patched (``run_timm_train.py`` runs):

    python examples/drop_in/mlp_output_norms.py --data OUT/digits32 \\
        OUT/runs/swin-dense-s4/train/last.pth.tar OUT/runs/swin-scheme-s4/train/last.pth.tar
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import timm
import torch
from timm.data import create_dataset, create_loader, resolve_data_config

from timm_scheme.io.training_checkpoint import _model_kwargs, _structure_of, rebuild
from timm_scheme.io.weights import read_training_checkpoint


def load(path: Path) -> Tuple[torch.nn.Module, Dict]:
    """The checkpoint's model in eval mode, dense or patched as its weights show, and train.py's args."""
    state, info = read_training_checkpoint(path)
    args = info.get("args") or {}
    if not args.get("model"):
        raise SystemExit(f"{path}: the checkpoint does not record its model (train.py's args); give checkpoints "
                         "written by timm's train.py")
    if _structure_of(state):  # block-diagonal MLPs: rebuilt as patched
        model = rebuild(path).model
    else:  # the dense model, built from train.py's args as rebuild builds its base model
        model = timm.create_model(args["model"], pretrained=False, **_model_kwargs(args["model"], {}, args, state, []))
        model.load_state_dict(state)
    return model.eval(), args


@torch.no_grad()
def mlp_norms(model: torch.nn.Module, images: torch.Tensor) -> Dict[str, Tuple[float, float]]:
    """{module name: (mean input norm, mean output norm)} of every module whose name ends in ``mlp``, the norm
    taken over channels (the last dimension, or dimension 1 of NCHW feature maps)."""
    norms: Dict[str, Tuple[float, float]] = {}

    def norm(t: torch.Tensor) -> float:
        return float((t.norm(dim=1) if t.dim() == 4 else t.norm(dim=-1)).mean())

    handles = [module.register_forward_hook(lambda m, i, o, name=name: norms.__setitem__(name, (norm(i[0]), norm(o))))
               for name, module in model.named_modules() if name.split(".")[-1] == "mlp"]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return norms


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="train.py checkpoints (last.pth.tar)")
    parser.add_argument("--data", type=Path, required=True, help="the image folder the runs used")
    parser.add_argument("--images", type=int, default=256, help="validation images to average over")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows: Dict[str, Dict[str, Tuple[float, float]]] = {}
    for path in args.checkpoints:
        model, train_args = load(path)
        config = resolve_data_config(train_args, model=model)
        loader = create_loader(create_dataset("", root=str(args.data), split="validation"),
                               input_size=config["input_size"], batch_size=args.images, mean=config["mean"],
                               std=config["std"], crop_pct=config["crop_pct"], interpolation=config["interpolation"],
                               num_workers=0, device=torch.device("cpu"))
        rows[str(path)] = mlp_norms(model, next(iter(loader))[0])
    names = list(dict.fromkeys(name for norms in rows.values() for name in norms))  # in model order
    common = Path(os.path.commonpath([p.resolve() for p in args.checkpoints])) if len(args.checkpoints) > 1 else None
    labels = [str(p.resolve().relative_to(common)) if common else str(p) for p in args.checkpoints]
    print("mean L2 norm over tokens, MLP input -> output" + (f" (checkpoints under {common})" if common else ""))
    print("| module | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(args.checkpoints))
    for name in names:
        cells = [f"{rows[str(p)][name][0]:.2f} -> {rows[str(p)][name][1]:.2f}" if name in rows[str(p)] else "-"
                 for p in args.checkpoints]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
