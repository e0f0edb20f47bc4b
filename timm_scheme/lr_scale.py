"""How block-diagonal projections learn relative to the dense layers they replace: ``block_lr_power`` and
``block_multiplier_power``, both through optimizer step hooks, with no change to the training loop.

Adam-type optimizers move every weight by about the learning rate, and decoupled weight decay holds each weight
at a size set by the learning rate and the decay, whatever the layer's fan-in: so a block that reads 1/groups
of the channels ends up with smaller outputs than the dense layer it replaced.

- ``block_lr_power = p``: every optimizer step that updates a block-diagonal weight is stretched by
  ``(dense fan-in / block fan-in) ** p``. For optimizers whose step is proportional to the learning rate (SGD,
  Adam, AdamW with its decoupled decay) that is exactly the step of a parameter group with a learning rate that
  much larger. The decay is stretched with the step, so AdamW's equilibrium weight size hardly moves.
- ``block_multiplier_power = p``: the weight trains as ``m * V`` would, with ``m = (dense fan-in / block
  fan-in) ** p`` a constant output multiplier (muP's parametrisation): it starts ``m`` times the host's spread,
  and for any optimizer each step is taken on ``V = W / m`` with the gradient ``m * dL/dW`` that the multiplier
  gives, then mapped back. The stored weight stays ``W``, the weight the forward uses, so nothing else (fusing,
  checkpoints, export, tracing) knows of ``m``. For AdamW the step on ``W`` is ``m`` times larger while the decay
  rate is not, so the weights settle ``m`` times larger: the blocks speak as loud as the dense layer.

The scales are plain attributes set by the patch from the config, and the hooks keep no state between steps, so
``--resume``, DDP, gradient accumulation (one step per optimizer step), EMA copies and ``torch.compile`` see them
alike. Gradient clipping before the step sees the gradients of ``W`` (a multiplier in the forward would show it
``m`` times larger ones). A stretched step keeps one copy of the weights it stretches while it runs. An optimizer
step that raises leaves the weights it was stepping at ``W / m``: do not save a model whose step failed. Steps
with a closure (LBFGS) are refused under a multiplier, since the closure would run the model on ``W / m``.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

_SCALED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
# id(optimizer) -> (layer, weight, copy before the step or None) for the layers that step
_STEPPING: Dict[int, List[Tuple[nn.Module, torch.Tensor, Any]]] = {}


def fan_in(layer: nn.Module) -> int:
    """Inputs of one output unit: a Linear's or Conv2d's (per conv group, times the kernel), one block's."""
    return int(layer.weight[0].numel())


def fan_in_ratio(new: nn.Module, olds: Sequence[nn.Module]) -> float:
    """Fan-in of the dense layer(s) ``olds`` over that of one block of ``new`` (several olds: a gated pair packed
    into one)."""
    return fan_in(olds[0]) / new.weight.shape[-1]


def set_lr_scale(new: nn.Module, olds: Sequence[nn.Module], power: float) -> None:
    """Give block-diagonal projection ``new`` the learning-rate scale ``(fan-in ratio to olds) ** power``."""
    new.lr_scale = fan_in_ratio(new, olds) ** power
    track(new)


@torch.no_grad()
def set_multiplier(new: nn.Module, olds: Sequence[nn.Module], power: float) -> None:
    """Make block-diagonal projection ``new`` train as under the output multiplier ``(fan-in ratio) ** power``:
    its freshly drawn weight (drawn like ``olds``) is scaled by it, and its steps follow it."""
    new.multiplier = fan_in_ratio(new, olds) ** power
    if new.multiplier != 1.0 and not new.weight.is_meta:
        new.weight.mul_(new.multiplier)
    track(new)


def track(layer: nn.Module) -> None:
    """Let optimizer steps scale ``layer``'s weight (copies of a layer ask for it too)."""
    if _scaled(layer):
        _SCALED.add(layer)


def _scaled(layer: nn.Module) -> bool:
    return layer.lr_scale != 1.0 or layer.multiplier != 1.0


@torch.no_grad()
def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    layers = [layer for layer in list(_SCALED) if _scaled(layer)]
    if not layers:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    layers = [layer for layer in layers if id(layer.weight) in held]
    if _closure(args, kwargs) is not None and any(layer.multiplier != 1.0 for layer in layers):
        raise ValueError(
            f"{type(optimizer).__name__}.step(closure): block_multiplier_power takes the step on W / m, so a "
            "closure that runs the model inside the step would see those weights; use an optimizer stepped "
            "without a closure (SGD, Adam, AdamW, timm's optimizers) or block_multiplier_power=0")
    stepping = []
    for layer in layers:
        weight = layer.weight
        if weight.grad is None:
            continue
        if layer.multiplier != 1.0:  # step on V = W / m with dL/dV = m * dL/dW
            weight.div_(layer.multiplier)
            weight.grad.mul_(layer.multiplier)
        stepping.append((layer, weight, weight.detach().clone() if layer.lr_scale != 1.0 else None))
    _STEPPING[id(optimizer)] = stepping


def _closure(args: Any, kwargs: Any) -> Any:
    # the hooks get step's own arguments, the optimizer first: step(self, closure=None)
    return args[1] if len(args) > 1 else kwargs.get("closure")


@torch.no_grad()
def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for layer, weight, before in _STEPPING.pop(id(optimizer), ()):
        if before is not None:
            weight.sub_(before).mul_(layer.lr_scale).add_(before)
        if layer.multiplier != 1.0:
            weight.mul_(layer.multiplier)
            if weight.grad is not None:  # the gradient as the loss gave it, for whatever reads it after the step
                weight.grad.div_(layer.multiplier)


register_optimizer_step_pre_hook(_before_step)
register_optimizer_step_post_hook(_after_step)
