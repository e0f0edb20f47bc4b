"""The one place that knows timm's MLP classes: which modules are channel-mixer MLPs SCHEME can replace, and how
to read one (its projections, gating, activation, hidden norm and widths). Patching and ``init="dense"`` both
read MLPs through :func:`read_mlp`. The families with their own MLP class are read through adapters
(``adapters.register_mlp_adapter``), registered in ``timm_adapters``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
from timm.layers.mlp import ConvMlp, GluMlp, Mlp, SwiGLU
from torch import nn

# replaced only when their forward is timm's own: a subclass that changes it is left alone
SUPPORTED_MLP_TYPES = (Mlp, GluMlp, SwiGLU, ConvMlp)


@dataclass
class MlpLayout:
    """A timm MLP as SCHEME sees it. ``fc1`` holds one projection, or for SwiGLU its two (gate first, then
    value), in the order SchemeMlp packs a gated unit's pair (``gate_last`` says which of the pair is the gate)."""
    name: str
    module: nn.Module
    fc1: List[nn.Module]
    fc2: nn.Module
    act: nn.Module
    norm: nn.Module
    gated: bool
    gate_last: bool
    norm_first: bool  # the hidden norm comes before the activation (ConvMlp's BatchNorm)
    use_conv: bool    # 1x1 convolutions on NCHW input
    bias: Tuple[bool, bool]
    drop: Tuple[float, float]

    @property
    def in_features(self) -> int:
        weight = self.fc1[0].weight
        return weight.shape[1]

    @property
    def hidden_features(self) -> int:
        return self.fc2.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.fc2.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.fc1[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fc1[0].weight.dtype


def is_timm_mlp(module: nn.Module) -> bool:
    return any(isinstance(module, t) and type(module).forward is t.forward for t in SUPPORTED_MLP_TYPES)


def read_mlp(name: str, m: nn.Module) -> MlpLayout:
    """The layout of a supported timm MLP; a clear error for the ones SCHEME cannot replace."""
    if isinstance(m, SwiGLU):
        # act(fc1_g(x)) * fc1_x(x): the gate comes first, as SchemeMlp(gate_last=False) packs it
        fc1, gated, gate_last, norm_first, drop = [m.fc1_g, m.fc1_x], True, False, False, (m.drop1.p, m.drop2.p)
    elif isinstance(m, GluMlp):
        fc1, gated, gate_last, norm_first, drop = [m.fc1], True, m.gate_last, False, (m.drop1.p, m.drop2.p)
    elif isinstance(m, ConvMlp):
        fc1, gated, gate_last, norm_first, drop = [m.fc1], False, True, True, (m.drop.p, 0.0)
    else:
        fc1, gated, gate_last, norm_first, drop = [m.fc1], False, True, False, (m.drop1.p, m.drop2.p)
    use_conv = isinstance(fc1[0], nn.Conv2d)
    if use_conv and any(f.kernel_size != (1, 1) or f.groups != 1 for f in (*fc1, m.fc2)):
        raise ValueError(f"scheme_patch: layer '{name}' uses a non 1x1 or grouped conv; cannot patch it")
    return MlpLayout(name=name, module=m, fc1=fc1, fc2=m.fc2, act=m.act, norm=m.norm, gated=gated,
                     gate_last=gate_last, norm_first=norm_first, use_conv=use_conv,
                     bias=(fc1[0].bias is not None, m.fc2.bias is not None), drop=drop)
