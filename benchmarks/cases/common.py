"""What every benchmark section shares: the run's sizes (``Plan``), DeiT-Tiny's width and tokens, and
the wrappers that time a call without autograd or with its backward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

import timm_scheme.kernels.mlp as bd_mlp
from timm_scheme.layers import SchemeMlp

C_TINY, TOKENS_TINY = 192, 197  # DeiT-Tiny width and tokens at 224 px


@dataclass
class Plan:
    """Sizes of one run (quick or full)."""
    batch: int
    model_names: Tuple[str, ...]
    train_batch: int
    scaling: bool
    compile: bool
    memory: bool
    adapted_models: Tuple[str, ...] = ("levit_128s", "efficientvit_m0", "tiny_vit_5m_224")


def without_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn()
    return run


def forward_backward(module: Callable, x: torch.Tensor, params) -> Callable[[], object]:
    x = x.detach().requires_grad_()

    def run():
        y = module(x)
        torch.autograd.grad(y.float().square().mean(), [x, *params])
    return run


def scheme_variant(scheme: SchemeMlp, kernel: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """One of the BD-MLP kernels run on ``scheme``'s weights, called directly (not through dispatch)."""
    fc1, fc2 = scheme.fc1, scheme.fc2
    if kernel == "unfused":
        return lambda x: bd_mlp.mlp_per_group(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, F.gelu)
    if kernel == "unfused_inplace":  # the same, GELU in place on each fc1 output (what eval would run untiled)
        return lambda x: bd_mlp.mlp_per_group(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, scheme.group_hidden)
    if kernel == "tiled":  # the tiled no-autograd kernel, called directly (whatever block_diagonal_mlp picks)
        return lambda x: bd_mlp.mlp_tiles_forward(x.reshape(-1, x.shape[-1]), fc1.weight, fc1.bias, fc2.weight,
                                                  fc2.bias, scheme.group_hidden).view(*x.shape[:-1], -1)
    if kernel == "batched":
        return lambda x: bd_mlp.mlp_batched(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, F.gelu)
    if kernel == "layered":
        return lambda x: fc2(F.gelu(fc1(x)))
    if kernel == "recompute":
        return lambda x: bd_mlp.block_diagonal_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, F.gelu,
                                                   recompute=True)
    return scheme
