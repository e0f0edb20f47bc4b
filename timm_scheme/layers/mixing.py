""" The CCA branch of a SCHEME mixer and its mixing weights: (alpha, 1 - alpha) = softmax(mix_logits), the CCA
weight capped by the annealing schedule as optimizer steps go by; shared by SchemeMlp and AdaptedSchemeMlp.
"""
import math
from typing import Optional, Tuple

import torch
from torch import nn

from .. import schedule
from ..schedule import CcaSchedule
from .cca import ChannelCovarianceAttention

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch builds without distributed support
    DTensor = None


SCHEDULE_BUFFERS = ('cca_limit', 'cca_step', 'cca_fade', 'cca_lr_peak')
_SCHEDULE_DEFAULTS = {'cca_step': 0, 'cca_fade': schedule.FULL, 'cca_lr_peak': 0.0}  # a format-1 checkpoint's


def check_mixing(kind: str, in_features: int, out_features: int, cca: bool, alpha_init: float) -> None:
    if cca and in_features != out_features:
        raise ValueError(
            f"{kind}: CCA needs in_features == out_features (got {in_features} -> {out_features}); "
            "pass cca=False for this layer")
    if not 0.0 < alpha_init < 1.0:
        raise ValueError(f"{kind}: alpha_init={alpha_init} must lie strictly between 0 and 1")


def _is_sharded(t: Optional[torch.Tensor]) -> bool:
    """A parameter split across ranks (a DTensor, as FSDP2's fully_shard leaves it between forwards)."""
    return DTensor is not None and isinstance(t, DTensor)


class CcaMixing(nn.Module):
    """ The training-time half of a SCHEME mixer: the CCA branch, the mixing logits, the schedule's state, and the
    mixer's output from its input and its block-diagonal MLP's output (``_mix_plain`` / ``_mix_eager``).
    A subclass sets ``groups`` and ``use_conv`` and calls ``_init_mixing``.
    """
    # the state dict entries of the training form, which fusing removes
    TRAINING_STATE = ('mix_logits',) + SCHEDULE_BUFFERS

    def _init_mixing(self, hidden_features: int, cca: bool, cca_scale: Optional[float], cca_normalize: bool,
                     alpha_init: float, cca_schedule: Optional[CcaSchedule], device, cca_form: str = "paper") -> None:
        """The CCA branch, its mixing logits and the schedule's state (shared with the adapted mixers)."""
        use_conv = self.use_conv
        if cca:
            scale = hidden_features ** -0.5 if cca_scale is None else cca_scale
            self.cca = ChannelCovarianceAttention(scale, normalize=cca_normalize, channels_last=not use_conv,
                                                  form=cca_form, groups=self.groups)
            # logits of (alpha, 1 - alpha); kept 1-D so timm's optimizer factories exempt them from weight decay
            logits = torch.tensor([math.log(alpha_init), math.log(1.0 - alpha_init)], device=device)
            self.mix_logits = nn.Parameter(logits)
            # a cap on the CCA weight set by hand (set_cca_limit): 1 = free, 0 = CCA off
            self.register_buffer('cca_limit', torch.ones((), device=device))
            # the schedule's state: optimizer steps taken, its cap in millionths (integers, so that an EMA copy
            # takes them as they are), and the peak learning rate seen
            self.register_buffer('cca_step', torch.zeros((), dtype=torch.long, device=device))
            self.register_buffer('cca_fade', torch.full((), schedule.FULL, dtype=torch.long, device=device))
            self.register_buffer('cca_lr_peak', torch.zeros((), device=device))
        else:
            self.cca = None
            self.register_parameter('mix_logits', None)
            for name in SCHEDULE_BUFFERS:
                self.register_buffer(name, None)
        self.cca_schedule = cca_schedule or CcaSchedule(mode="off")
        # host copies of the schedule state: skip decisions and the next cap without a device sync
        self._steps_done, self._fade, self._lr_peak = 0, schedule.FULL, 0.0
        self.cca_skip_threshold = 0.0
        self.cca_in_eval = False  # set by fuse_for_inference to measure what fusing discards
        # the last skip decision, a plain bool so torch.compile and traced forms read it without a host sync
        self._cca_skipped = False
        # training on CPU: recompute each hidden tile in backward instead of keeping the (tokens, hidden)
        # activations; saves most of the mixer's activation memory for a few % more step time (not with the
        # channel shuffle, whose fc2 groups need every group's hidden tile: the per-group kernel runs instead)
        self.recompute_hidden = False
        if self.cca is not None:
            schedule.track(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        if self.cca is not None:  # a deep copy (or unpickled model) trains with its own clock
            schedule.track(self)

    @property
    def has_cca(self) -> bool:
        return self.cca is not None

    # --- the mixing weights and their annealing ---------------------------------------------------------

    def _anneal_factor(self) -> torch.Tensor:
        """The cap on the CCA weight: the hand-set limit times the schedule's."""
        return self.cca_limit.float() * (self.cca_fade.float() * (1.0 / schedule.FULL))

    def mixing_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(alpha, 1 - alpha) as scalars of at least float32, after the annealing cap."""
        dtype = torch.promote_types(self.mix_logits.dtype, torch.float32)
        weights = torch.softmax(self.mix_logits.to(dtype), dim=0)
        cca_weight = weights[1] * self._anneal_factor().to(dtype)
        return 1.0 - cca_weight, cca_weight

    def _cca_weight_plain(self) -> torch.Tensor:
        # traced and scripted forms: float32 (FX cannot branch on a parameter's dtype)
        return torch.softmax(self.mix_logits.float(), dim=0)[1] * self._anneal_factor()

    def cca_weight(self, learnt: bool = False) -> float:
        """1 - alpha: how much the CCA branch contributes (0.0 once fused or without CCA).
        ``learnt=True`` gives the value the mixing logits hold, before the annealing cap."""
        if self.cca is None:
            return 0.0
        with torch.no_grad():
            if learnt:
                return float(torch.softmax(self.mix_logits.float(), dim=0)[1])
            return float(self.mixing_weights()[1])

    @property
    def cca_annealed_out(self) -> bool:
        """The schedule has driven the CCA weight to exactly 0 (known without a device sync)."""
        return self._fade == 0

    @torch.no_grad()
    def advance_cca_schedule(self, lr: Optional[float] = None) -> None:
        """One optimizer step, taken at learning rate ``lr``: move the schedule on (timm_scheme calls it after
        every optimizer step that updates this mixer's mixing logits)."""
        if self.cca is None:
            return
        self._steps_done += 1
        if lr is not None:
            self._lr_peak = max(self._lr_peak, lr)
        self._fade = int(round(schedule.FULL * self.cca_schedule.cap(self._steps_done, lr, self._lr_peak)))
        self.cca_step.fill_(self._steps_done)
        self.cca_lr_peak.fill_(self._lr_peak)
        self.cca_fade.fill_(self._fade)
        if not _is_sharded(self.mix_logits):
            self.update_cca_skip()
        elif self.cca_annealed_out:  # reading FSDP2-sharded logits would be a collective: the next forward decides
            self._cca_skipped = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.cca is not None and prefix + 'mix_logits' in state_dict:
            for name, value in _SCHEDULE_DEFAULTS.items():  # written before the schedule existed (format 1)
                state_dict.setdefault(prefix + name, torch.full_like(getattr(self, name), value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.cca is not None and not self.cca_step.is_meta:
            # a resumed run continues the schedule where it stopped
            self._steps_done, self._fade = int(self.cca_step), int(self.cca_fade)
            self._lr_peak = float(self.cca_lr_peak)
            self.update_cca_skip()

    def update_cca_skip(self) -> bool:
        """Decide whether training skips the CCA branch: annealed out, or (with `cca_skip_threshold`) a weight
        below the threshold, read from the mixing weights (identical on every rank). Eager forwards decide on
        every call; torch.compile'd and traced forwards reuse the last decision (no host sync, no graph
        break), which `train()` and this method refresh. Returns the decision."""
        if self.cca is None:
            self._cca_skipped = False
        elif self.cca_annealed_out:
            self._cca_skipped = True
        elif self.cca_skip_threshold <= 0:
            self._cca_skipped = False
        else:
            with torch.no_grad():
                self._cca_skipped = bool(self.mixing_weights()[1] < self.cca_skip_threshold)
        return self._cca_skipped

    def train(self, mode: bool = True) -> 'CcaMixing':
        super().train(mode)
        # FSDP2 shards the logits between forwards: reading them here would be a collective that a rank calling
        # train() alone would hang in, so the next eager forward decides instead (with the logits gathered)
        if mode and not _is_sharded(self.mix_logits):
            self.update_cca_skip()
        return self

    def _mix_plain(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mixer's output from its input ``x`` and its MLP branch's output ``y``, in standard ops."""
        cca = self.cca
        if cca is None:
            return y
        cca_weight = self._cca_weight_plain().to(y.dtype)
        if (self.training or self.cca_in_eval) and not self._cca_skipped:
            return torch.lerp(y, cca(x, y).to(y.dtype), cca_weight)
        return (1.0 - cca_weight) * y

    @torch.jit.unused
    def _mix_eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``_mix_plain`` with the eager-only savings: CCA skipped once annealed out (or below the threshold)."""
        if self.cca is None:
            return y
        alpha, cca_weight = self.mixing_weights()
        use_cca = self.training or self.cca_in_eval
        if use_cca and (self.cca_skip_threshold > 0 or self.cca_annealed_out):
            use_cca = not (self._cca_skipped if torch.compiler.is_compiling() else self.update_cca_skip())
        if not use_cca:
            return alpha.to(y.dtype) * y
        # alpha = 1 - cca_weight, so this is alpha * y + cca_weight * CCA(x) in one fused pass (and a
        # cheaper backward than two scalings and an add)
        return torch.lerp(y, self.cca(x, y).to(y.dtype), cca_weight.to(y.dtype))

    def _drop_cca(self) -> None:
        self.cca = None
        self.mix_logits = None
        for name in SCHEDULE_BUFFERS:
            setattr(self, name, None)
        self._cca_skipped = False
