"""How a new layer starts like the layer it replaces: its tensors drawn with the replaced ones' mean and spread
(timm's ViTs, Swin and MetaFormers: trunc-normal std 0.02, zero biases), not nn.Linear's default, whose bound
1/sqrt(fan_in) of one group is several times larger. Used by ``patch`` and ``adapters``."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


@torch.no_grad()
def draw_like(new: torch.Tensor, olds: Sequence[torch.Tensor]) -> bool:
    """Fill ``new`` with the mean and spread of ``olds`` taken together; a constant (zero biases, a norm's ones,
    a bias of 0.1) is copied exactly, nothing to follow (no tensors) gives zeros. Returns False, leaving ``new``
    as it is, for meta or non-finite tensors (init="dense" refuses those by name)."""
    if new.is_meta or any(t.is_meta for t in olds):
        return False
    if not olds:
        new.zero_()
        return True
    values = torch.cat([t.detach().reshape(-1) for t in olds])
    if bool((values == values[0]).all()):
        new.fill_(float(values[0]))
        return True
    values = values.float()
    mean, std = float(values.mean()), float(values.std())
    if not (math.isfinite(mean) and math.isfinite(std)):
        return False
    new.normal_(mean, std)
    return True


def draw_layer_like(new: nn.Module, olds: Sequence[nn.Module]) -> None:
    """A projection drawn like the ones it replaces (several for a gated pair packed into one): weight, then
    bias."""
    if draw_like(new.weight, [o.weight for o in olds]) and getattr(new, "bias", None) is not None:
        draw_like(new.bias, [o.bias for o in olds if o.bias is not None])
