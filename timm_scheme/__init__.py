"""SCHEME channel mixers for timm vision transformers.

    import timm, timm_scheme
    model = timm.create_model("deit_tiny_patch16_224")
    timm_scheme.scheme_patch(model, groups=4, expansion=8)
    ...  # train
    timm_scheme.fuse_for_inference(model)
"""
from .version import __version__
from .config import SchemeConfig
from .fuse import FuseReport, FuseVerificationError, fuse_for_inference
from .mixers import cca_in_eval, cca_weights, is_fused, is_patched, scheme_mixers, set_cca_limit
from .schedule import CcaSchedule, cca_anneal_limit
from .layers import AdaptedSchemeMlp, BlockDiagonalConv1x1, BlockDiagonalLinear, ChannelCovarianceAttention, SchemeMlp
from .patching.adapters import MlpAdapter, mlp_adapters, register_mlp_adapter, unregister_mlp_adapter
from .patching.patch import find_mlps, scheme_patch
from .patching import timm_adapters  # registers the adapters of timm's families with their own MLP class
from . import models  # registers the SCHEMEformer family in timm's model registry
from . import fx  # timm's FX tracing calls the SCHEME modules as leaves: FX computes what eager does
from .io import export_onnx, export_torchscript, from_pretrained, push_to_hub, save_pretrained  # also registers the checkpoint architecture
from .stats import count_macs

# optional integrations, imported on demand: timm_scheme.integrations.lora (PEFT), timm_scheme.integrations.quantize
# (int8: torch.ao, torchao)

__all__ = [
    "SchemeConfig", "CcaSchedule", "scheme_patch", "find_mlps", "is_patched", "is_fused", "fuse_for_inference",
    "FuseReport", "FuseVerificationError", "cca_weights", "set_cca_limit", "cca_anneal_limit", "cca_in_eval",
    "scheme_mixers", "SchemeMlp", "AdaptedSchemeMlp", "MlpAdapter", "register_mlp_adapter", "unregister_mlp_adapter",
    "mlp_adapters", "BlockDiagonalLinear", "BlockDiagonalConv1x1", "ChannelCovarianceAttention",
    "save_pretrained", "push_to_hub", "from_pretrained", "export_onnx", "export_torchscript", "count_macs",
]
