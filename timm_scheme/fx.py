"""timm's FX tracing calls the SCHEME modules as leaves.

Traced through, a SCHEME module records its plain per-group form (``kernels.dispatch.tracing``), which sums in
another order than the tiled / fused kernels eager runs: the FX model would differ from eager in the last bits
(by input, shape and thread count), where timm's own ``test_model_forward_fx`` asserts bit equality. As leaves of timm's tracer
(timm's ``create_feature_extractor``, ``FeatureGraphNet`` / ``feature_cls='fx'``, and its model tests), the graph
calls the modules themselves: exactly the eager computation, at any batch size (nothing inside them is
recorded); scripting such a graph scripts their TorchScript forms. Tracers without timm's leaf list (plain
``torch.fx.symbolic_trace``, torchvision's own feature extraction, ``torch.jit.trace`` and ONNX,
``torch.export``) still record the plain forms.
"""
from timm.layers import register_notrace_module

from .layers import AdaptedSchemeMlp, BlockDiagonalConv1x1, BlockDiagonalLinear, ChannelCovarianceAttention, SchemeMlp

# every module whose forward picks another kernel when traced; timm's tracer matches subclasses too (isinstance),
# so the int8 mixers of ``layers.int8`` (SchemeMlp subclasses) are leaves as well
LEAF_MODULES = (SchemeMlp, AdaptedSchemeMlp, BlockDiagonalLinear, BlockDiagonalConv1x1, ChannelCovarianceAttention)

for _module in LEAF_MODULES:
    register_notrace_module(_module)
