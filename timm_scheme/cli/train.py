"""``timm-scheme train``: any timm model, patched with SCHEME, trained with timm's factories, then fused, verified
and exported (``timm_scheme.training.run``).

    timm-scheme train                                  # ViT-Tiny on scikit-learn's digits, SCHEME g=4, E=8
    timm-scheme train --model schemeformer_ppaa_s12_224 --data-dir /data/imagenette --epochs 100
    timm-scheme train --cca-anneal-start 0.5           # CCA annealed by a cosine over the second half of the
                                                       # run's optimizer steps (default: faded with the lr)
    torchrun --standalone --nproc_per_node 2 -m timm_scheme.cli train   # DDP, one replica per process
"""
from __future__ import annotations

import argparse

from timm.utils import ParseKwargs

from .scheme_flags import add_scheme_flags, scheme_flags_given


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="vit_tiny_patch16_224", help="any timm model name")
    model.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                       help="passed to timm.create_model, e.g. embed_dim=96 depth=6 mlp_ratio=8")
    model.add_argument("--img-size", type=int, default=None,
                       help="input size (default: 16 on digits, the model's own on an image folder)")
    model.add_argument("--patch-size", type=int, default=4,
                       help="on digits, passed to models that take it (ViT-style patch embedding)")
    model.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    model.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights")
    model.add_argument("--initial-checkpoint", default=None, metavar="PATH",
                       help="start from these weights of the model (timm's checkpoint formats; a classifier of "
                            "another class count is left as built)")

    add_scheme_flags(parser)
    scheme = parser.add_argument_group("SCHEME in training")
    scheme.add_argument("--no-scheme", action="store_true", help="train the model as timm builds it (baseline)")
    scheme.add_argument("--calibration-images", type=int, default=256, metavar="N",
                        help="with --init dense: training images (without augmentation) on which the conversion "
                             "fits each layer; 0 converts from the weights alone")

    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default=None,
                      help="image folder with train/ and validation/ (or val/) class subfolders; "
                           "default: scikit-learn's bundled digits")
    data.add_argument("--train-split", default="train")
    data.add_argument("--val-split", default="validation")
    data.add_argument("--split-seed", type=int, default=0, help="digits: seed of the fixed train/test split")
    data.add_argument("--workers", type=int, default=0, help="data loader processes (image folder)")
    data.add_argument("--aa", default=None, help="image folder: timm auto-augment policy, e.g. rand-m9-mstd0.5")
    data.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    data.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    data.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off)")
    data.add_argument("--mixup-prob", type=float, default=1.0)
    data.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=10)
    optim.add_argument("--batch-size", type=int, default=64,
                       help="per process: under torchrun the global batch is this times the process count")
    optim.add_argument("--opt", default="adamw", help="timm optimizer name")
    optim.add_argument("--lr", type=float, default=2e-3)
    optim.add_argument("--weight-decay", type=float, default=0.05)
    optim.add_argument("--sched", default="cosine", help="timm scheduler name")
    optim.add_argument("--warmup-epochs", type=int, default=1)
    optim.add_argument("--min-lr", type=float, default=1e-5)
    optim.add_argument("--clip-grad", type=float, default=None)

    run_group = parser.add_argument_group("run")
    run_group.add_argument("--output", default="output/train", help="folder for logs, checkpoint and export")
    run_group.add_argument("--resume", default=None, metavar="CHECKPOINT",
                           help="continue from a checkpoint.pth written by an earlier run")
    run_group.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                           help="stop once this epoch is done, keeping the schedule of --epochs "
                                "(for time-limited jobs: continue later with --resume)")
    run_group.add_argument("--seed", type=int, default=0)
    run_group.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run_group.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    run_group.add_argument("--no-export", action="store_true", help="skip writing export/")


def run(args: argparse.Namespace) -> int:
    """Train, then fuse, verify and export; 0 when the fused model matches the unfused one."""
    from ..training.run import run as run_training

    args.scheme = scheme_flags_given(args)
    return run_training(args)
