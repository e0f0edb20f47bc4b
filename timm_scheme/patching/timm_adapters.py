"""The adapters of timm's families that have their own MLP class (LeViT, TinyViT, EfficientViT, ...), registered
on import: the package's ``__init__`` imports this module, so ``scheme_patch`` reads them out of the box. Kept
apart from ``timm_mlps`` so that the registry (``adapters``) and timm's MLP classes do not import each other."""
from __future__ import annotations

import torch
from torch import nn

from ..layers.mlp import scale_affine_
from .adapters import register_mlp_adapter


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
    scale_affine_(layer.linear, alpha)
    if layer.use_clipped:
        for bound in (layer.output_min, layer.output_max):
            bound.mul_(alpha.to(bound.dtype))


def _register_timm_adapters() -> None:
    from timm.models import (efficientformer_v2, efficientvim, efficientvit_mit, efficientvit_msra, fastvit,
                             gemma4_vit, inception_next, levit, pvt_v2, shvit, swiftformer, tiny_vit, visformer,
                             vitamin)

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
