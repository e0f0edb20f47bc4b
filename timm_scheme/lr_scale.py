"""Block-diagonal projections that learn at the pace of the dense layers they replace (``block_lr_power``).

Adam-type optimizers move every weight by about the learning rate, and decoupled weight decay holds each weight
at a size set by the learning rate and the decay, whatever the layer's fan-in: so a block that reads 1/groups
of the channels ends up with smaller outputs than the dense layer it replaced. With
``SchemeConfig.block_lr_power = p``, every optimizer step that updates a block-diagonal weight is stretched by
``(dense fan-in / block fan-in) ** p``. For optimizers whose step is proportional to the learning rate (SGD,
Adam, AdamW with its decoupled decay) that is exactly the step of a parameter group with a learning rate that
much larger, with no change to the training loop; p = 1 is muP's rule for Adam.

The scale is a plain attribute set by the patch, and the stretch keeps no state between steps, so ``--resume``,
DDP, gradient accumulation (one stretch per optimizer step), EMA copies and ``torch.compile`` see it alike. A
step keeps one copy of the weights it stretches while it runs.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

_SCALED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_BEFORE: Dict[int, List[Tuple[torch.Tensor, torch.Tensor, float]]] = {}  # id(optimizer) -> (weight, copy, scale)


def fan_in(layer: nn.Module) -> int:
    """Inputs of one output unit: a Linear's or Conv2d's (per conv group, times the kernel), one block's."""
    return int(layer.weight[0].numel())


def set_lr_scale(new: nn.Module, olds: Sequence[nn.Module], power: float) -> None:
    """Give block-diagonal projection ``new`` the learning-rate scale ``(fan-in of olds / its block's) ** power``
    (``olds``: the dense layers it replaces, several for a gated pair packed into one)."""
    new.lr_scale = (fan_in(olds[0]) / new.weight.shape[-1]) ** power
    track(new)


def track(layer: nn.Module) -> None:
    """Let optimizer steps stretch ``layer``'s weight by its ``lr_scale`` (copies of a layer ask for it too)."""
    if layer.lr_scale != 1.0:
        _SCALED.add(layer)


def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    layers = [layer for layer in list(_SCALED) if layer.lr_scale != 1.0]
    if not layers:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    _BEFORE[id(optimizer)] = [(layer.weight, layer.weight.detach().clone(), layer.lr_scale) for layer in layers
                              if id(layer.weight) in held and layer.weight.grad is not None]


@torch.no_grad()
def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for weight, before, scale in _BEFORE.pop(id(optimizer), ()):
        weight.sub_(before).mul_(scale).add_(before)


register_optimizer_step_pre_hook(_before_step)
register_optimizer_step_post_hook(_after_step)
