"""SCHEME channel mixers for timm vision transformers.

    import timm, timm_scheme
    model = timm.create_model("deit_tiny_patch16_224")
    timm_scheme.scheme_patch(model, groups=4, expansion=8)
    ...  # train
    timm_scheme.fuse_for_inference(model)
"""
from .config import SchemeConfig
from .fuse import (FuseReport, cca_anneal_limit, cca_in_eval, cca_weights, fuse_for_inference, scheme_mixers,
                   set_cca_limit)
from .layers import BlockDiagonalConv1x1, BlockDiagonalLinear, ChannelCovarianceAttention, SchemeMlp
from .patch import find_mlps, is_patched, scheme_patch
from . import models  # registers the SCHEMEformer family in timm's model registry
from .io import export_onnx, from_pretrained, push_to_hub, save_pretrained  # also registers timm's "scheme_patched"

__version__ = "0.1.0"

__all__ = [
    "SchemeConfig", "scheme_patch", "find_mlps", "is_patched", "fuse_for_inference", "cca_weights",
    "set_cca_limit", "cca_anneal_limit", "cca_in_eval", "scheme_mixers", "FuseReport", "SchemeMlp", "BlockDiagonalLinear",
    "BlockDiagonalConv1x1", "ChannelCovarianceAttention",
    "save_pretrained", "push_to_hub", "from_pretrained", "export_onnx",
]
