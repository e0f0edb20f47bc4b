"""Section ``kernels``: the block-diagonal linear against dense GEMMs of equal FLOPs, and the alternative kernels."""
from __future__ import annotations

import torch
from torch import nn

import timm_scheme.kernels.block_diagonal as bd

from ..harness import Settings, Table, compare, ms, ratio
from .common import C_TINY, Plan, TOKENS_TINY, without_grad


def _grouped_mm_available(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        torch._grouped_mm(x[:2].reshape(2, 1, -1), w[:2].transpose(1, 2))
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def kernel_table(plan: Plan, settings: Settings) -> Table:
    tokens = plan.batch * TOKENS_TINY
    groups = 4
    table = Table(
        f"Block-diagonal linear vs dense GEMM of equal FLOPs (inference, g={groups}, {tokens} tokens = "
        f"batch {plan.batch} x {TOKENS_TINY}, fp32)",
        ["layer", "kernel", "ms", "throughput vs dense, same output shape", "vs dense, same input shape"])
    for in_f, out_f, label in ((C_TINY, 8 * C_TINY, "fc1 192->1536"), (8 * C_TINY, C_TINY, "fc2 1536->192")):
        torch.manual_seed(0)
        in_g, out_g = in_f // groups, out_f // groups
        x = torch.randn(tokens, in_f)
        w = torch.randn(groups, out_g, in_g) * in_g ** -0.5
        b = torch.randn(out_f)
        # equal FLOPs, two ways: same output (K = in/g) or same input (N = out/g)
        x_small = torch.randn(tokens, in_g)
        dense_same_out = nn.Linear(in_g, out_f)
        dense_same_in = nn.Linear(in_f, out_g)
        conv = nn.Conv2d(in_f, out_f, 1, groups=groups)
        x_nchw = x.t().reshape(1, in_f, tokens, 1).contiguous()
        fns = {
            "dense, same output": lambda: dense_same_out(x_small),
            "dense, same input": lambda: dense_same_in(x),
            "ours (GEMM per group into output slices)": lambda: bd.block_diagonal_linear(x, w, b),
            "F.linear per group + cat": lambda: bd.linear_per_group(x, w, b, groups, in_g, out_g),
            "batched bmm on (g, tokens, c) view": lambda: bd.linear_batched(x, w, b),
            "grouped 1x1 Conv2d (NCHW)": lambda: conv(x_nchw),
        }
        if _grouped_mm_available(x, w):
            wt = w.transpose(1, 2)
            fns["torch._grouped_mm"] = lambda: (torch._grouped_mm(x.view(tokens, groups, in_g).transpose(0, 1), wt)
                                                + b.view(groups, 1, out_g)).transpose(0, 1).reshape(tokens, out_f)
        t = compare({k: without_grad(f) for k, f in fns.items()}, settings)
        for name in fns:
            if name.startswith("dense"):
                continue
            table.add(label, name, ms(t[name]), ratio(t, "dense, same output", name),
                      ratio(t, "dense, same input", name))
        table.add(label, "dense, same output (reference)", ms(t["dense, same output"]), 1.0,
                  ratio(t, "dense, same input", "dense, same output"))
    table.notes.append("throughput ratio = median over interleaved rounds of t(dense) / t(kernel); target >= 0.9")
    return table
