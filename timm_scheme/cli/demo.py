"""The main job on its embedded default: patch a timm model, train it briefly on scikit-learn's digits,
fuse it, check the fused model against the unfused one, and print what changed."""
from __future__ import annotations

import argparse
import copy
import itertools

import torch
import torch.nn.functional as F

from ..training.digits import load_digits_tensors
from ..diagnostics import cca_diagnostics, summarize
from ..fuse import FuseVerificationError, fuse_for_inference, max_relative_difference
from ..mixers import cca_weights, scheme_mixers
from ..patching.patch import find_mlps, scheme_patch
from ..stats import count_macs, count_mlp_params, count_params
from ..training import random_batches, short_schedule, train_one_epoch
from ..training.run import create_with_optional
from .scheme_flags import add_scheme_flags, scheme_flags_given


CCA_REPORTS = 4  # with CCA on, how often training stops to report what the branch carries


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="deit_tiny_patch16_224", help="any timm model name")
    parser.add_argument("--img-size", type=int, default=32, help="digits are upsampled to this size")
    parser.add_argument("--patch-size", type=int, default=8, help="passed to models that take it")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_scheme_flags(parser)


def build_model(name: str, img_size: int, patch_size: int, num_classes: int = 10) -> torch.nn.Module:
    return create_with_optional(name, dict(num_classes=num_classes), dict(img_size=img_size, patch_size=patch_size))


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_digits_tensors(args.img_size, in_chans=3, seed=args.seed)
    input_size = tuple(x_train.shape[1:])
    dense = build_model(args.model, args.img_size, args.patch_size)
    mlp_names = [name for name, _ in find_mlps(dense)]
    before = dict(params=count_params(dense), mlp_params=count_mlp_params(dense, mlp_names),
                  macs=count_macs(dense, input_size))

    model = scheme_patch(copy.deepcopy(dense), **scheme_flags_given(args))  # the one line of "your training code"
    config = model.scheme_config
    print(f"patched {len(scheme_mixers(model))} MLPs of {args.model} (groups={config.groups}, "
          f"expansion={config.expansion:g}, CCA {'on, annealed by ' + repr(config.cca_anneal) if config.cca else 'off'}); "
          f"training {args.steps} steps on digits ({len(y_train)} train / {len(y_test)} test images, "
          f"{args.img_size}px)")
    optimizer, scheduler = short_schedule(model, args.lr, args.steps)
    batches = random_batches(x_train, y_train, args.steps, args.batch_size, args.seed)
    # with CCA, the same steps in quarters, and between them what the branch carries on a fixed batch
    parts = CCA_REPORTS if config.cca else 1
    if config.cca:
        print(f"CCA ({config.cca_form} form) on {len(x_test[:64])} test images: its weight 1 - alpha, its share of "
              "the mixers' output, the attention it puts on other groups' channels")
    done = 0
    for part in range(parts):
        if config.cca:
            print(f"  step {done:4d}: {summarize(cca_diagnostics(model, x_test[:64], warn=False))}")
        steps = (args.steps * (part + 1)) // parts - done
        train_one_epoch(model, itertools.islice(batches, steps), optimizer,
                        lambda logits, y: F.cross_entropy(logits, y, label_smoothing=0.1), scheduler=scheduler,
                        progress=not args.no_progress, total=steps)
        done += steps
    if config.cca:
        print(f"  step {done:4d}: {summarize(cca_diagnostics(model, x_test[:64], warn=False))}")

    model.eval()
    learnt = cca_weights(model, learnt=True)
    with torch.no_grad():
        unfused_logits = model(x_test)
    try:
        fuse_for_inference(model, x_test)  # checks the fused model against the unfused eval output
    except FuseVerificationError as error:
        print(f"error: {error}")
    report = model.scheme_fuse_report
    with torch.no_grad():
        fused_logits = model(x_test)
    after = dict(params=count_params(model), mlp_params=count_mlp_params(model, mlp_names),
                 macs=count_macs(model, input_size))

    print("\n== summary ==")
    print(f"mixers replaced        {len(mlp_names)}")
    for key, label in (("params", "parameters"), ("mlp_params", "MLP parameters"), ("macs", "MACs / image")):
        print(f"{label:22} {before[key]:>12,} -> {after[key]:>12,}  ({after[key] / before[key]:.2f}x)")
    print(f"test top-1 unfused     {accuracy(unfused_logits, y_test):.2%}")
    print(f"test top-1 fused       {accuracy(fused_logits, y_test):.2%}")
    difference = max_relative_difference(unfused_logits, fused_logits)
    print(f"fused vs unfused eval  max relative difference {difference:.2e}")
    print(f"CCA tensors left       {len(report.leftover_tensors)}")
    print(f"discarded by fusing    {report.summary()}")
    if report.cca_weights:
        print("per-layer 1 - alpha at fusing (learnt, and in effect after the annealing cap):")
    for name, weight in report.cca_weights.items():
        print(f"  {name:40} {learnt[name]:.4f}  {weight:.4f}")
    ok = report.verified and difference <= report.tolerance
    print(f"check: {'PASS' if ok else 'FAIL'} (fused equals unfused eval output within {report.tolerance:g})")
    return 0 if ok else 1


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())
