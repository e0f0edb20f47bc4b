"""Copying the kept blocks: the dense weights of the assigned units into a SCHEME mixer's block-diagonal
projections (and per-unit hidden norm), the other slots silenced."""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..layers import SchemeMlp
from .units import DenseMlpWeights, Routes


@torch.no_grad()
def load_dense_blocks(new: SchemeMlp, old: nn.Module, weights: DenseMlpWeights, units: List[List[int]]) -> None:
    """Fill ``new`` with the blocks of the dense weights that ``units`` (per route) keeps; other slots stay as
    built (random fc1 rows) and are silenced by zeroing their fc2 columns."""
    routes = Routes.of(new)
    groups, c_in, c_out = new.groups, new.fc1.in_features, new.fc2.out_features
    per_group = routes.per_group
    in_size, out_size = c_in // groups, c_out // groups
    fc1 = new.fc1.weight.view(groups, -1, per_group, in_size)  # (g, 1 or 2 halves, units, in/g)
    fc1_bias = None if new.fc1.bias is None else new.fc1.bias.view(groups, -1, per_group)
    fc2 = new.fc2.weight                                        # (g, out/g, units)
    halves = [(weights.fc1_first, weights.bias1_first)]
    if weights.fc1_second is not None:
        halves.append((weights.fc1_second, weights.bias1_second))
    fc2.zero_()
    for route, kept in enumerate(units):
        i, j = routes.pairs[route]
        index = torch.tensor(kept, dtype=torch.long, device=weights.fc2.device)
        n, cols, outs = len(kept), slice(i * in_size, (i + 1) * in_size), slice(j * out_size, (j + 1) * out_size)
        rows, columns = slice(routes.fc1_slot(route), routes.fc1_slot(route) + n), \
            slice(routes.fc2_slot(route), routes.fc2_slot(route) + n)
        for half, (w1, b1) in enumerate(halves):
            fc1[i, half, rows] = w1[index][:, cols].to(fc1.dtype)
            if fc1_bias is not None:
                fc1_bias[i, half, rows] = b1[index].to(fc1_bias.dtype) if b1 is not None else 0
        fc2[j, :, columns] = weights.fc2[outs][:, index].to(fc2.dtype)
    if new.fc2.bias is not None and weights.bias2 is not None:
        new.fc2.bias.copy_(weights.bias2)
    _load_hidden_norm(new, old, units, routes)


@torch.no_grad()
def undo_alpha(new: SchemeMlp) -> None:
    """Scale fc2 by 1 / alpha, so the eval-mode output (alpha * BD-MLP) is the converted MLP itself."""
    if new.has_cca:
        alpha = new.mixing_weights()[0]
        for t in (new.fc2.weight, new.fc2.bias):
            if t is not None:
                t.copy_((t.float() / alpha).to(t.dtype))


def _load_hidden_norm(new: SchemeMlp, old: nn.Module, units: List[List[int]], routes: Routes) -> None:
    """Per-unit parameters and statistics of a hidden norm (before the shuffle) follow their units; new units
    keep fresh ones."""
    if isinstance(old.norm, nn.Identity):
        return
    slots = [routes.pairs[r][0] * routes.per_group + routes.fc1_slot(r) + t
             for r, kept in enumerate(units) for t in range(len(kept))]
    sources = [u for kept in units for u in kept]
    for attr in ("weight", "bias", "running_mean", "running_var"):
        src, dst = getattr(old.norm, attr, None), getattr(new.norm, attr, None)
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.dim() == 1:
            dst[slots] = src[sources].to(dst.dtype)


def hidden_norm_is_exact(old: nn.Module, hidden_new: int, hidden_old: int) -> bool:
    """A norm over all hidden units (LayerNorm, GroupNorm) sees new statistics when the width changes."""
    per_unit = isinstance(old.norm, (nn.Identity, nn.modules.batchnorm._BatchNorm))
    return per_unit or hidden_new == hidden_old
