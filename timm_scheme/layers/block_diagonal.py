""" Block-diagonal projections: `groups` independent dense maps, one per contiguous channel group.

Weights are stored as (groups, out_features // groups, in_features // groups). The kernels live in
``timm_scheme.kernels``, which picks the fastest form per call and plain ones when traced or scripted.
"""
import math
from typing import Optional

import torch
from torch import nn

from ..kernels import block_diagonal_conv1x1, block_diagonal_linear, conv1x1_grouped, linear_per_group
from ..kernels.dispatch import tracing


class _BlockDiagonal(nn.Module):
    def __init__(
            self,
            in_features: int,
            out_features: int,
            groups: int,
            bias: bool = True,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if groups < 1 or in_features % groups or out_features % groups:
            raise ValueError(
                f"{type(self).__name__}: groups={groups} must divide in_features={in_features} and "
                f"out_features={out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups, out_features // groups, in_features // groups, **dd))
        self.bias = nn.Parameter(torch.empty(out_features, **dd)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Linear's default init, applied per block (fan-in is one group's width); scheme_patch redraws the
        # weights to follow the layer it replaces
        bound = 1.0 / math.sqrt(self.weight.shape[-1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._forward_plain(x)
        return self._forward_eager(x)

    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """Standard ops only, sized by the module (FX sees no weight shapes): what tracing and scripting record."""
        raise NotImplementedError

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_plain(x) if tracing() else self._forward_fast(x)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense (out_features, in_features) matrix, zeros off the diagonal blocks."""
        return torch.block_diag(*self.weight.unbind(0))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"groups={self.groups}, bias={self.bias is not None}")


class BlockDiagonalLinear(_BlockDiagonal):
    """ Block-diagonal linear layer on channels-last input (..., in_features).
    """
    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        return linear_per_group(x, self.weight, self.bias, self.groups, self.in_features // self.groups,
                                self.out_features // self.groups)

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        return block_diagonal_linear(x, self.weight, self.bias)


class BlockDiagonalConv1x1(_BlockDiagonal):
    """ Block-diagonal 1x1 convolution on NCHW input (B, in_features, H, W).
    """
    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        return conv1x1_grouped(x, self.weight, self.bias, self.groups, self.in_features // self.groups,
                               self.out_features // self.groups)

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        return block_diagonal_conv1x1(x, self.weight, self.bias)
