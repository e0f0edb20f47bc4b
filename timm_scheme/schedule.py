"""The clock of CCA annealing: every optimizer step that updates a SCHEME mixer's mixing logits advances that
mixer's step count (a buffer), and the mixer derives its CCA cap from it.

Counting optimizer steps, not forwards, is what makes the schedule survive the training loop as the user
wrote it: gradient accumulation (one step per accumulated batch), activation checkpointing (recomputed
forwards are not steps), torch.compile (the count lives outside the graph), DDP (every rank steps alike),
EMA copies (they copy the integer buffer) and ``--resume`` (the buffer is in the state dict).
"""
from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch import nn

_MIXERS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def track(mixer: nn.Module) -> None:
    """Let optimizer steps advance ``mixer``'s annealing clock (called by every SchemeMlp with CCA)."""
    _MIXERS.add(mixer)


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    mixers = [m for m in list(_MIXERS) if getattr(m, "mix_logits", None) is not None]
    if not mixers:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for mixer in mixers:
        if id(mixer.mix_logits) in stepped:
            mixer.advance_cca_schedule()


register_optimizer_step_post_hook(_after_optimizer_step)


def cca_anneal_limit(progress: float, start: float = 0.5) -> float:
    """CCA cap of the annealing schedule at ``progress`` (fraction of training done): 1 until ``start``,
    then a cosine to 0 at the end. What a mixer with ``cca_anneal_steps`` applies by itself."""
    if not 0.0 <= start < 1.0:
        raise ValueError(f"cca_anneal_limit: start={start} must lie in [0, 1)")
    t = min(max((progress - start) / (1.0 - start), 0.0), 1.0)
    return 0.0 if t >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * t))
