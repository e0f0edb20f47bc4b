"""The one object that carries every SCHEME option.

It is recorded on a patched model (``model.scheme_config``) and serialised into ``config.json``, so
fusing, saving and loading all read the same values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

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
        cca: add the channel covariance attention branch for training.
        cca_scale_mode: ``"hidden"`` scales the channel covariance by ``hidden ** -0.5`` as the paper
            does; ``"normalized"`` L2-normalises each channel over tokens and divides by
            ``cca_temperature``, which keeps the logits independent of the token count.
        cca_temperature: softmax temperature of the ``"normalized"`` mode.
        alpha_init: initial weight of the BD-MLP branch; CCA starts at ``1 - alpha_init``. ``None`` picks
            0.5 for ``init="random"`` and 0.9 for ``init="dense"``, where a large CCA share disturbs the
            converted pretrained function during fine-tuning (``examples/convert_pretrained.py --alpha-init 0.5``).
        cca_skip_threshold: in training, a layer whose CCA weight is below this skips the CCA branch.
        fuse_warn_threshold: fusing warns about layers whose CCA weight is above this.
        init: how the block-diagonal weights start: ``"random"``, or ``"dense"`` to convert the pretrained
            dense MLPs (hidden units assigned to groups to keep the most of them; see ``timm_scheme.convert``).
    """

    groups: int = 4
    expansion: Optional[float] = 8.0
    cca: bool = True
    cca_scale_mode: str = "hidden"
    cca_temperature: float = 0.1
    alpha_init: Optional[float] = None
    cca_skip_threshold: float = 0.0
    fuse_warn_threshold: float = 0.01
    init: str = "random"

    def __post_init__(self):
        if self.alpha_init is None:  # resolved here, so config.json records the value in effect
            object.__setattr__(self, "alpha_init", DEFAULT_ALPHA_INIT.get(self.init, 0.5))
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups={self.groups!r}: expected a whole number >= 1 (e.g. 2, 4, 8)")
        if self.expansion is not None:
            if isinstance(self.expansion, bool) or not isinstance(self.expansion, (int, float)) \
                    or not self.expansion > 0:
                raise ValueError(
                    f"expansion={self.expansion!r}: expected a number > 0 (e.g. 4 or 8), "
                    "or None to keep each layer's hidden width")
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

    def cca_scale(self, hidden_features: int) -> float:
        """The logit scale of one layer's channel covariance."""
        if self.cca_scale_mode == "hidden":
            return float(hidden_features) ** -0.5
        return 1.0 / self.cca_temperature

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "SchemeConfig":
        return cls(**_check_option_names(values))

    @classmethod
    def from_options(cls, **options: Any) -> "SchemeConfig":
        return cls(**_check_option_names(options))


def _check_option_names(values: Dict[str, Any]) -> Dict[str, Any]:
    known = {f.name for f in dataclasses.fields(SchemeConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown SCHEME option(s) {unknown}; valid options: {sorted(known)}")
    return dict(values)
