"""The one place that knows timm's MLP classes: which modules are channel-mixer MLPs SCHEME can replace, and how
to read one (its projections, gating, activation, hidden norm and widths). Patching and ``init="dense"`` both
read MLPs through :func:`read_mlp`. The families with their own MLP class are read through adapters
(``adapters.register_mlp_adapter``), registered at the end of this module."""
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


# --- timm families with their own MLP class: the adapters that let scheme_patch read them ------------------------

def _is_layers(module: nn.Module, *kinds) -> bool:
    """An nn.Sequential whose layers are of these types in this order (a parameter-free layer for ``None``)."""
    return len(module) == len(kinds) and all(
        not any(True for _ in layer.parameters()) if kind is None else isinstance(layer, kind)
        for layer, kind in zip(module, kinds))


def _lowformer_mlp(module: nn.Module, name: str) -> bool:
    # LowFormer's MLP branch: nn.Sequential(GroupNorm1, 1x1 conv, GELU, 1x1 conv, Dropout) in a ResidualBlock
    from timm.layers import GroupNorm1
    return name.endswith("mlp.main") and _is_layers(module, GroupNorm1, nn.Conv2d, None, nn.Conv2d, None)


def _iformer_ffn(module: nn.Module, name: str) -> bool:
    # iFormer's FFN: nn.Sequential(ConvNorm 1x1, act, ConvNorm 1x1) inside its Residual (layer scale, drop path)
    from timm.models.iformer import ConvNorm
    return name.endswith("mixer.module") and _is_layers(module, ConvNorm, None, ConvNorm)


def _efficientvit_ffn(module: nn.Module, name: str) -> bool:
    # EfficientViT (MIT)'s FFN is the MBConv of each block's local module (the conv stages' MBConvs are the
    # network's convolutional blocks, left alone); alpha folds into its last BatchNorm when no activation follows
    return name.endswith("local_module.main") and isinstance(module.point_conv.act, nn.Identity)


@torch.no_grad()
def _fold_clipped_linear(layer: nn.Module, alpha: torch.Tensor) -> None:
    """alpha * clamp(W h, lo, hi) = clamp(alpha W h, alpha lo, alpha hi) for alpha > 0: Gemma4's projection
    clamps its output (to +-inf unless a checkpoint set bounds), so the bounds scale with the weights."""
    from .layers.mlp import scale_affine_
    scale_affine_(layer.linear, alpha)
    if layer.use_clipped:
        for bound in (layer.output_min, layer.output_max):
            bound.mul_(alpha.to(bound.dtype))


def _register_timm_adapters() -> None:
    from timm.models import (efficientformer_v2, efficientvim, efficientvit_mit, efficientvit_msra, fastvit,
                             gemma4_vit, inception_next, levit, pvt_v2, shvit, swiftformer, tiny_vit, visformer,
                             vitamin)

    from .adapters import register_mlp_adapter

    # act / pre: the forward is pre -> fc1 -> [BatchNorm] -> act -> fc2 -> [BatchNorm]: the fused kernels can run
    plain = dict(fc1="fc1", fc2="fc2", act="act")
    register_mlp_adapter(tiny_vit.NormMlp, **plain, pre="norm")         # LayerNorm on the input, then fc1-act-fc2
    register_mlp_adapter(swiftformer.Mlp, **plain, pre="norm1")         # BatchNorm on the input
    register_mlp_adapter(fastvit.ConvMlp, **plain, pre="conv")          # a depthwise 7x7 conv on the input
    register_mlp_adapter(pvt_v2.MlpWithDepthwiseConv, fc1="fc1", fc2="fc2", hidden=("dwconv",))  # depthwise 3x3
    register_mlp_adapter(inception_next.ConvMlp, **plain, hidden=("norm",))
    # a 1x1 conv + BatchNorm for each projection: the first BatchNorm is per hidden unit, alpha folds into the last
    register_mlp_adapter(levit.LevitMlp, fc1="ln1.linear", fc2="ln2.linear", hidden=("ln1.bn",), output="ln2.bn",
                         act="act")
    register_mlp_adapter(efficientvit_msra.ConvMlp, fc1="pw1.conv", fc2="pw2.conv", hidden=("pw1.bn",),
                         output="pw2.bn", act="act")
    register_mlp_adapter(shvit.FFN, fc1="pw1.c", fc2="pw2.c", hidden=("pw1.bn",), output="pw2.bn", act="act")
    register_mlp_adapter(efficientvim.FFN, fc1="fc1.conv", fc2="fc2.conv", hidden=("fc1.norm",), output="fc2.norm",
                         act="fc1.act")
    register_mlp_adapter(efficientformer_v2.ConvMlpWithNorm, fc1="fc1.conv", fc2="fc2.conv",
                         hidden=("fc1.bn", "mid"), output="fc2.bn")  # mid: a depthwise 3x3 conv + BatchNorm
    # a grouped 3x3 conv between the projections (without it, the fused kernels run)
    register_mlp_adapter(visformer.SpatialMlp, fc1="conv1", fc2="conv3", hidden=("conv2",), act="act1")
    # gated: act(gate) * value, the gate's and the value's unit k in the same group
    register_mlp_adapter(vitamin.GeGluMlp, fc1=("w0", "w1"), fc2="w2")
    register_mlp_adapter(gemma4_vit.Gemma4GatedMlp, fc1=("gate_proj.linear", "up_proj.linear"),
                         fc2="down_proj.linear", output="down_proj", fold=_fold_clipped_linear)
    # an inverted bottleneck as FFN: 1x1 conv (+ norm), depthwise conv (+ norm), 1x1 conv + norm
    register_mlp_adapter(efficientvit_mit.MBConv, fc1="inverted_conv.conv", fc2="point_conv.conv",
                         hidden=("inverted_conv.norm", "depth_conv"), output="point_conv.norm",
                         applies=_efficientvit_ffn)
    register_mlp_adapter(nn.Sequential, fc1="1", fc2="3", act="2", pre="0", applies=_lowformer_mlp)
    register_mlp_adapter(nn.Sequential, fc1="0.c", fc2="2.c", hidden=("0.bn",), output="2.bn", act="1",
                         applies=_iformer_ffn)


_register_timm_adapters()
