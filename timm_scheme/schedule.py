"""How CCA is driven out of a SCHEME mixer by the end of training, with no change to the training loop.

Every optimizer step that updates a mixer's mixing logits advances that mixer's schedule, which caps its CCA
weight (the cap is kept in the mixer's buffers, as an integer in millionths so that timm's EMA copies it
rather than averaging it). Counting optimizer steps, not forwards, makes the schedule follow the loop as the
user wrote it: gradient accumulation (one step per accumulated batch), activation checkpointing (recomputed
forwards are not steps), torch.compile (the cap lives outside the graph), DDP (every rank steps alike), EMA
copies, and ``--resume`` (the buffers are in the state dict).

Schedules:
* ``"lr"``: the cap follows the learning rate of the mixing logits' parameter group, 1 at its peak so far and
  0 once it falls below ``lr_floor`` of the peak: any decaying LR schedule (cosine, step, linear) ends with
  steps that train the deployed function alone, without the patch knowing how long training is.
* ``"steps"``: 1 until ``start`` of ``steps`` optimizer steps, then a cosine to exactly 0 at the last one.
* ``"off"``: no cap; the learnt weight alone, as in the paper (fusing then discards what CCA carries).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

SCHEDULES = ("lr", "steps", "off")
FULL = 1_000_000  # the cap of an un-annealed mixer, in millionths


@dataclass(frozen=True)
class CcaSchedule:
    """When a mixer's CCA weight is capped, and how far; see the module docstring."""
    mode: str = "lr"
    steps: int = 0
    start: float = 0.5
    lr_floor: float = 0.1

    def __post_init__(self):
        if self.mode not in SCHEDULES:
            raise ValueError(f"cca_anneal={self.mode!r}: expected one of {SCHEDULES}")
        if self.mode == "steps" and not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"cca_anneal='steps' needs cca_anneal_steps >= 1 (the optimizer steps of the whole "
                             f"training, e.g. epochs x updates per epoch); got {self.steps!r}")
        if not 0.0 <= self.start < 1.0:
            raise ValueError(f"cca_anneal_start={self.start!r}: expected a fraction in [0, 1)")
        if not 0.0 < self.lr_floor < 1.0:
            raise ValueError(f"cca_lr_floor={self.lr_floor!r}: expected a fraction in (0, 1)")

    def cap(self, step: int, lr: Optional[float], lr_peak: float) -> float:
        """The CCA cap after ``step`` optimizer steps, the last at learning rate ``lr`` (peak so far ``lr_peak``)."""
        if self.mode == "steps":
            return cca_anneal_limit(step / self.steps, self.start)
        if self.mode == "lr" and lr is not None and lr_peak > 0:
            return min(max((lr / lr_peak - self.lr_floor) / (1.0 - self.lr_floor), 0.0), 1.0)
        return 1.0


def cca_anneal_limit(progress: float, start: float = 0.5) -> float:
    """CCA cap of the ``"steps"`` schedule at ``progress`` (fraction of training done): 1 until ``start``,
    then a cosine to 0 at the end."""
    if not 0.0 <= start < 1.0:
        raise ValueError(f"cca_anneal_limit: start={start} must lie in [0, 1)")
    t = min(max((progress - start) / (1.0 - start), 0.0), 1.0)
    return 0.0 if t >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * t))


# --- the clock: optimizer steps ---------------------------------------------------------------------------

_MIXERS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def track(mixer: nn.Module) -> None:
    """Let optimizer steps advance ``mixer``'s schedule (every SchemeMlp with CCA asks for it)."""
    _MIXERS.add(mixer)


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    mixers = [m for m in list(_MIXERS) if getattr(m, "mix_logits", None) is not None]
    if not mixers:
        return
    lr_of = {id(p): group.get("lr") for group in optimizer.param_groups for p in group["params"]}
    for mixer in mixers:
        key = id(mixer.mix_logits)
        if key in lr_of:
            lr = lr_of[key]
            mixer.advance_cca_schedule(float(lr) if lr is not None else None)


register_optimizer_step_post_hook(_after_optimizer_step)
