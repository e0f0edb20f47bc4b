"""The one object that carries every SCHEME option.

It is recorded on a patched model (``model.scheme_config``) and serialised into ``config.json``, so
fusing, saving and loading all read the same values.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

from .kernels.cca import CCA_FORMS
from .schedule import SCHEDULES, CcaSchedule

CCA_SCALE_MODES = ("hidden", "normalized")
INIT_MODES = ("random", "dense")
DEFAULT_ALPHA_INIT = {"random": 0.5, "dense": 0.9}


@dataclass(frozen=True)
class SchemeConfig:
    """Options of a SCHEME patch.

    Attributes:
        groups: channel groups of the block-diagonal projections (1 = dense).
        expansion: hidden units per input channel (the width of ``fc2``'s input over ``in_features``;
            for gated MLPs the gate doubles ``fc1``). ``None`` keeps each layer's original width.
        cca: add the channel covariance attention branch for training (off by default: in timm's own train.py
            on digits, every CCA variant measured left a ViT's and a Swin's deployed model below the
            block-diagonal MLP trained alone; see the README's drop-in results). With it, ``cca_anneal`` removes it
            by the end of training.
        cca_form: what the branch computes (``timm_scheme.kernels.cca``): ``"paper"``, X A^T with A =
            softmax(scale X^T X) over channels, the paper's definition; ``"authors"``, the authors' code as it runs
            (its key a reshape of the channels-by-tokens tensor, not a transpose); ``"rescaled"``, the paper's
            branch scaled per sample to the RMS of the block-diagonal MLP's output; ``"output"``, A applied to the
            block-diagonal MLP's output Y (Y A^T), so the branch is never louder than the block; ``"output_cross"``,
            the same with each channel attending only to channels of the other groups.
        cca_scale_mode: ``"hidden"`` scales the channel covariance by ``hidden ** -0.5`` as the paper
            does; ``"normalized"`` L2-normalises each channel over tokens and divides by
            ``cca_temperature``, which keeps the logits independent of the token count.
        cca_temperature: softmax temperature of the ``"normalized"`` mode.
        alpha_init: initial weight of the BD-MLP branch; CCA starts at ``1 - alpha_init``. ``None`` picks
            0.5 for ``init="random"`` and 0.9 for ``init="dense"``, where a large CCA share disturbs the
            converted pretrained function during fine-tuning (``examples/convert_pretrained.py --alpha-init 0.5``).
        cca_anneal: how CCA is driven out by the end of training, with no change to the training loop (see
            ``timm_scheme.schedule``): ``"lr"`` fades it with the learning rate (full at its peak, 0 below
            ``cca_lr_floor`` of it), ``"steps"`` by a cosine over ``cca_anneal_steps`` optimizer steps starting at
            ``cca_anneal_start`` of them, ``"off"`` leaves the learnt weight alone (the paper). ``None`` picks
            ``"steps"`` when ``cca_anneal_steps`` is given, else ``"lr"``.
        cca_anneal_steps: optimizer steps of the whole training, for ``"steps"``.
        cca_anneal_start: fraction of ``cca_anneal_steps`` after which the cosine begins.
        cca_lr_floor: fraction of the peak learning rate at which ``"lr"`` reaches 0.
        cca_skip_threshold: in training, a layer whose CCA weight is below this skips the CCA branch.
        fuse_warn_threshold: fusing warns about layers whose CCA weight is above this.
        init: how the block-diagonal weights start: ``"random"``, or ``"dense"`` to convert the pretrained
            dense MLPs (hidden units assigned to groups to keep the most of them; see ``timm_scheme.conversion``).
        skip_unfit: leave dense the layers whose widths ``groups`` (or the expanded hidden width) does not fit,
            and patch the rest, instead of refusing the whole patch; the skipped layers and why are kept on
            ``model.scheme_skipped`` and logged.
        channel_shuffle: fc2's group j reads chunk j of every fc1 group's hidden units (a ShuffleNet-style
            block transpose between the projections, the structure of Monarch matrices), so each mixer mixes
            across groups at no extra FLOPs or parameters. Needs hidden widths divisible by ``groups ** 2``.
    """

    groups: int = 4
    expansion: Optional[float] = 8.0
    cca: bool = False
    cca_form: str = "paper"
    cca_scale_mode: str = "hidden"
    cca_temperature: float = 0.1
    alpha_init: Optional[float] = None
    cca_anneal: Optional[str] = None
    cca_anneal_steps: Optional[int] = None
    cca_anneal_start: float = 0.5
    cca_lr_floor: float = 0.1
    cca_skip_threshold: float = 0.0
    fuse_warn_threshold: float = 0.01
    init: str = "random"
    skip_unfit: bool = False
    channel_shuffle: bool = False

    def __post_init__(self):
        # resolved here, so config.json records the values in effect
        if self.alpha_init is None:
            object.__setattr__(self, "alpha_init", DEFAULT_ALPHA_INIT.get(self.init, 0.5))
        if self.cca_anneal is None:
            object.__setattr__(self, "cca_anneal", "steps" if self.cca_anneal_steps is not None else "lr")
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups={self.groups!r}: expected a whole number >= 1 (e.g. 2, 4, 8)")
        if self.expansion is not None:
            if isinstance(self.expansion, bool) or not isinstance(self.expansion, (int, float)) \
                    or not (self.expansion > 0 and math.isfinite(self.expansion)):
                raise ValueError(
                    f"expansion={self.expansion!r}: expected a finite number > 0 (e.g. 4 or 8), "
                    "or None to keep each layer's hidden width")
        if self.cca_form not in CCA_FORMS:
            raise ValueError(f"cca_form={self.cca_form!r}: expected one of {CCA_FORMS}")
        if self.cca_form == "output_cross" and self.groups < 2:
            raise ValueError(f"cca_form='output_cross' attends to the channels of the other groups: it needs "
                             f"groups >= 2 (got groups={self.groups}); use cca_form='output' for one group")
        if self.cca_form == "authors" and self.cca_scale_mode != "hidden":
            raise ValueError("cca_form='authors' reproduces the authors' code, which scales by hidden ** -0.5: use "
                             f"cca_scale_mode='hidden' with it (got {self.cca_scale_mode!r})")
        if self.cca_scale_mode not in CCA_SCALE_MODES:
            raise ValueError(f"cca_scale_mode={self.cca_scale_mode!r}: expected one of {CCA_SCALE_MODES}")
        if not self.cca_temperature > 0:
            raise ValueError(f"cca_temperature={self.cca_temperature!r}: expected a number > 0")
        if not 0.0 < self.alpha_init < 1.0:
            raise ValueError(f"alpha_init={self.alpha_init!r}: expected a value strictly between 0 and 1")
        if not 0.0 <= self.cca_skip_threshold < 1.0:
            raise ValueError(f"cca_skip_threshold={self.cca_skip_threshold!r}: expected 0 <= value < 1")
        if not 0.0 <= self.fuse_warn_threshold <= 1.0:
            raise ValueError(f"fuse_warn_threshold={self.fuse_warn_threshold!r}: expected 0 <= value <= 1")
        if self.init not in INIT_MODES:
            raise ValueError(f"init={self.init!r}: expected one of {INIT_MODES}")
        if self.cca_anneal_steps is not None and (isinstance(self.cca_anneal_steps, bool)
                                                  or not isinstance(self.cca_anneal_steps, int)):
            raise ValueError(f"cca_anneal_steps={self.cca_anneal_steps!r}: expected a whole number of optimizer "
                             "steps (e.g. epochs * updates per epoch)")
        if self.cca_anneal_steps is not None and self.cca_anneal != "steps":
            raise ValueError(f"cca_anneal_steps={self.cca_anneal_steps} is used by cca_anneal='steps' only (got "
                             f"cca_anneal={self.cca_anneal!r}); drop one of them")
        self.schedule()  # validates the schedule options

    def schedule(self) -> CcaSchedule:
        """The CCA annealing schedule every mixer follows."""
        if self.cca_anneal not in SCHEDULES:
            raise ValueError(f"cca_anneal={self.cca_anneal!r}: expected one of {SCHEDULES}")
        return CcaSchedule(mode=self.cca_anneal, steps=self.cca_anneal_steps or 0, start=self.cca_anneal_start,
                           lr_floor=self.cca_lr_floor)

    def cca_scale(self, hidden_features: int) -> float:
        """The logit scale of one layer's channel covariance."""
        if self.cca_scale_mode == "hidden":
            return float(hidden_features) ** -0.5
        return 1.0 / self.cca_temperature

    def describe(self) -> str:
        """groups, expansion and every option that differs from the defaults, as ``k=v, ...``."""
        defaults = SchemeConfig()
        return ", ".join(f"{k}={v}" for k, v in self.to_dict().items()
                         if k in ("groups", "expansion") or v != getattr(defaults, k))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "SchemeConfig":
        return cls(**_check_option_names(values))

    @classmethod
    def from_options(cls, **options: Any) -> "SchemeConfig":
        return cls(**_check_option_names(options))


# options that were tried, measured no accuracy gain, and were removed (the evidence stays in the docs); a config
# that recorded one switched off (0, as every checkpoint trained without it did) still loads
RETIRED_OPTIONS = {
    "block_lr_power": "stretched the block-diagonal weights' optimizer steps by the fan-in ratio",
    "block_multiplier_power": "trained the block-diagonal weights as under an output multiplier",
}


def _without_retired(values: Dict[str, Any]) -> Dict[str, Any]:
    kept = dict(values)
    for name, what in RETIRED_OPTIONS.items():
        value = kept.pop(name, None)
        if value not in (None, 0, 0.0):
            raise ValueError(
                f"{name}={value!r}: this option {what}, measured no accuracy gain in timm's own train.py and was "
                f"removed; a model trained with it cannot be rebuilt as it trained. Only {name}=0 (off) is read")
    return kept


def _check_option_names(values: Dict[str, Any]) -> Dict[str, Any]:
    values = _without_retired(values)
    known = {f.name for f in dataclasses.fields(SchemeConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown SCHEME option(s) {unknown}; valid options: {sorted(known)}")
    return dict(values)
