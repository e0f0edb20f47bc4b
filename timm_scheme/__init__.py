"""SCHEME channel mixers for timm vision transformers.

    import timm, timm_scheme
    model = timm.create_model("deit_tiny_patch16_224")
    timm_scheme.scheme_patch(model, groups=4, expansion=8)
    ...  # train
    timm_scheme.fuse_for_inference(model)
"""
from .config import SchemeConfig
from .fuse import FuseReport, cca_in_eval, cca_weights, fuse_for_inference, set_cca_limit
from .layers import BlockDiagonalConv1x1, BlockDiagonalLinear, ChannelCovarianceAttention, SchemeMlp
from .patch import find_mlps, is_patched, scheme_patch

__version__ = "0.1.0"

__all__ = [
    "SchemeConfig", "scheme_patch", "find_mlps", "is_patched", "fuse_for_inference", "cca_weights",
    "set_cca_limit", "cca_in_eval", "FuseReport", "SchemeMlp", "BlockDiagonalLinear",
    "BlockDiagonalConv1x1", "ChannelCovarianceAttention",
]
