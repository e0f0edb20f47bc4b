"""Pure nn.Modules of SCHEME, no knowledge of any model (their int8 twins in ``int8``, imported on demand)."""
from .adapted import AdaptedSchemeMlp
from .block_diagonal import BlockDiagonalConv1x1, BlockDiagonalLinear
from .cca import ChannelCovarianceAttention
from .mlp import SchemeMlp

__all__ = ["BlockDiagonalLinear", "BlockDiagonalConv1x1", "ChannelCovarianceAttention", "SchemeMlp",
           "AdaptedSchemeMlp"]
