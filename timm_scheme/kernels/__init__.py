"""Kernels of the SCHEME layers as functions of their weights (block-diagonal projections, the whole BD-MLP, CCA,
int8 on demand in ``int8``); ``dispatch`` decides which one runs."""
from . import dispatch
from .block_diagonal import (
    block_diagonal_conv1x1, block_diagonal_linear, conv1x1_grouped, linear_batched, linear_grouped_mm,
    linear_into_slices, linear_per_group, shuffle_channels)
from .mlp import (
    MIN_TILE_TOKENS, TILE_BYTES_PER_THREAD, PerGroupBlockDiagonalMlp, TiledBlockDiagonalMlp, block_diagonal_mlp,
    block_diagonal_mlp_nchw, mlp_batched, mlp_grouped_mm, mlp_per_group, mlp_tiles_forward)
from .cca import (
    CCA_FORMS, CovarianceAttention, apply_channel_attention, cca_branch, cca_branch_plain, channel_attention,
    covariance_attention, covariance_attention_plain)

__all__ = [
    "dispatch", "block_diagonal_linear", "block_diagonal_conv1x1", "block_diagonal_mlp", "block_diagonal_mlp_nchw",
    "linear_per_group", "linear_batched", "linear_grouped_mm", "linear_into_slices", "conv1x1_grouped",
    "mlp_per_group", "mlp_batched", "mlp_grouped_mm", "mlp_tiles_forward", "PerGroupBlockDiagonalMlp",
    "TiledBlockDiagonalMlp", "TILE_BYTES_PER_THREAD", "MIN_TILE_TOKENS", "shuffle_channels", "covariance_attention",
    "covariance_attention_plain", "CovarianceAttention", "CCA_FORMS", "cca_branch", "cca_branch_plain",
    "channel_attention", "apply_channel_attention",
]
