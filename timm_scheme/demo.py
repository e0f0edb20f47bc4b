"""The main job on its embedded default: patch a timm model, train it briefly on scikit-learn's digits,
fuse it, check the fused model against the unfused one, and print what changed."""
from __future__ import annotations

import argparse
import copy
import math
import time

from timm.optim import create_optimizer_v2
import torch
import torch.nn.functional as F

from .data import load_digits_tensors
from .fuse import (cca_anneal_limit, cca_weights, fuse_for_inference, max_relative_difference, scheme_mixers,
                   set_cca_limit)
from .patch import find_mlps, scheme_patch
from .stats import count_macs, count_mlp_params, count_params
from .train import create_with_optional


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="deit_tiny_patch16_224", help="any timm model name")
    parser.add_argument("--img-size", type=int, default=32, help="digits are upsampled to this size")
    parser.add_argument("--patch-size", type=int, default=8, help="passed to models that take it")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--expansion", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--anneal-start", type=float, default=0.5,
                        help="fraction of training after which CCA is annealed to zero; 1 disables annealing")


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

    model = scheme_patch(copy.deepcopy(dense), groups=args.groups, expansion=args.expansion)
    print(f"patched {len(scheme_mixers(model))} MLPs of {args.model} "
          f"(groups={args.groups}, expansion={args.expansion:g}); training {args.steps} steps on digits "
          f"({len(y_train)} train / {len(y_test)} test images, {args.img_size}px)")
    train(model, x_train, y_train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
          anneal_start=args.anneal_start)

    model.eval()
    learnt = cca_weights(model, learnt=True)
    with torch.no_grad():
        unfused_logits = model(x_test)
    fuse_for_inference(model, x_test[:64])
    report = model.scheme_fuse_report
    with torch.no_grad():
        fused_logits = model(x_test)
    max_rel_diff = max_relative_difference(unfused_logits, fused_logits)
    leftover = [k for k in model.state_dict() if "mix_logits" in k or "cca" in k]
    after = dict(params=count_params(model), mlp_params=count_mlp_params(model, mlp_names),
                 macs=count_macs(model, input_size))

    print("\n== summary ==")
    print(f"mixers replaced        {len(mlp_names)}")
    for key, label in (("params", "parameters"), ("mlp_params", "MLP parameters"), ("macs", "MACs / image")):
        print(f"{label:22} {before[key]:>12,} -> {after[key]:>12,}  ({after[key] / before[key]:.2f}x)")
    print(f"test top-1 unfused     {accuracy(unfused_logits, y_test):.2%}")
    print(f"test top-1 fused       {accuracy(fused_logits, y_test):.2%}")
    print(f"fused vs unfused eval  max relative difference {max_rel_diff:.2e}")
    print(f"CCA tensors left       {len(leftover)}")
    print(f"discarded by fusing    {report.summary()}")
    print("per-layer 1 - alpha at fusing (learnt, and in effect after the annealing cap):")
    for name, weight in report.cca_weights.items():
        print(f"  {name:40} {learnt[name]:.4f}  {weight:.4f}")
    ok = max_rel_diff <= 1e-5 and not leftover
    print("check: " + ("PASS" if ok else "FAIL") + " (fused equals unfused eval output within 1e-5)")
    return 0 if ok else 1


def short_schedule(model: torch.nn.Module, lr: float, steps: int):
    """(optimizer, scheduler) of the short runs: timm's AdamW, 10% linear warm-up, then a cosine to 0."""
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return optimizer, scheduler


def train(model, x, y, *, steps: int, batch_size: int, lr: float, seed: int, anneal_start: float = 1.0,
          log_every: int = 50) -> None:
    optimizer, scheduler = short_schedule(model, lr, steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if anneal_start < 1.0:
            set_cca_limit(model, cca_anneal_limit((step - 1) / steps, anneal_start))
        idx = torch.randint(len(y), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % log_every == 0 or step == steps:
            weights = list(cca_weights(model).values())
            mean_cca = sum(weights) / len(weights) if weights else 0.0
            print(f"step {step:4d}/{steps}  loss {loss.item():.3f}  mean 1-alpha {mean_cca:.3f}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())
