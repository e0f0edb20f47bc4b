""" Block-diagonal projections: `groups` independent dense maps, one per contiguous channel group.

Weights are stored as (groups, out_features // groups, in_features // groups).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


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
        # nn.Linear's default init, applied per block (fan-in is one group's width)
        bound = 1.0 / math.sqrt(self.weight.shape[-1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense (out_features, in_features) matrix, zeros off the diagonal blocks."""
        return torch.block_diag(*self.weight.unbind(0))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"groups={self.groups}, bias={self.bias is not None}")


class BlockDiagonalLinear(_BlockDiagonal):
    """ Block-diagonal linear layer on channels-last input (..., in_features).
    """
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return F.linear(x, self.weight[0], self.bias)
        # One GEMM per group on a strided view of x: no copy of the input; on CPU this beat a
        # batched matmul (which needs a transposed copy) and the grouped 1x1 conv.
        width = self.weight.shape[-1]
        bias = self.bias.chunk(self.groups) if self.bias is not None else (None,) * self.groups
        outs = [F.linear(x[..., i * width:(i + 1) * width], self.weight[i], bias[i]) for i in range(self.groups)]
        return torch.cat(outs, dim=-1)


class BlockDiagonalConv1x1(_BlockDiagonal):
    """ Block-diagonal 1x1 convolution on NCHW input (B, in_features, H, W).
    """
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        # (groups, out_g, in_g) @ (B, groups, in_g, H*W): one batched GEMM, channels stay on dim 1
        y = torch.matmul(self.weight, x.reshape(b, self.groups, -1, h * w))
        y = y.reshape(b, self.out_features, h, w)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y
