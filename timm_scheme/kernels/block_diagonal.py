"""Block-diagonal projections (channels-last linear, NCHW 1x1 conv) as functions of their weights; the whole
block-diagonal MLP is in ``mlp``.

Weights are (groups, out_features // groups, in_features // groups): group i maps input channels
[i * in_g, (i + 1) * in_g) to output channels [i * out_g, (i + 1) * out_g). ``dispatch`` picks the form;
every form computes the same function (tests compare each against a dense matmul with a block mask).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import dispatch



# --- plain forms: traceable, scriptable, exportable ----------------------------------------------------------

def linear_per_group(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     groups: int, in_g: int, out_g: int) -> torch.Tensor:
    """One F.linear per group on a slice of channels-last ``x``, then cat: the form that traces, scripts and
    exports as standard ops, and that autograd and torch.compile handle natively."""
    outs: List[torch.Tensor] = []
    for i in range(groups):
        b = bias[i * out_g:(i + 1) * out_g] if bias is not None else None
        outs.append(F.linear(x[..., i * in_g:(i + 1) * in_g], weight[i], b))
    return torch.cat(outs, dim=-1)


def conv1x1_grouped(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    groups: int, in_g: int, out_g: int) -> torch.Tensor:
    """Block-diagonal 1x1 convolution of NCHW ``x`` as one grouped convolution (one ONNX Conv)."""
    return F.conv2d(x, weight.reshape(groups * out_g, in_g, 1, 1), bias, groups=groups)


def shuffle_channels(x: torch.Tensor, groups: int, dim: int = -1) -> torch.Tensor:
    """The channel shuffle between fc1 and fc2: with ``dim`` holding ``groups`` blocks of ``groups`` chunks each
    (block i = fc1 group i's units), output block j is chunk j of every block in block order, so fc2's group j
    reads units of every fc1 group. A block transpose, so its own inverse. Standard ops (a view, a transpose, a
    copy): traces and exports."""
    x = x.unflatten(dim, (groups, groups, -1))  # no shape read: FX and TorchScript record it as it is
    first = dim - 2 if dim < 0 else dim
    return x.transpose(first, first + 1).flatten(first, first + 2)


# --- channels-last block-diagonal linear ------------------------------------------------------------------

def _sizes(weight: torch.Tensor) -> Tuple[int, int, int]:
    groups, out_g, in_g = weight.shape
    return groups, in_g, out_g


def block_diagonal_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y[..., group i] = x[..., group i] @ weight[i].T + bias[group i], in the form ``dispatch`` picks."""
    if weight.shape[0] == 1:
        return F.linear(x, weight[0], bias)
    kernel = dispatch.linear_kernel(x, weight, bias)
    if kernel == dispatch.BATCHED:
        return linear_batched(x, weight, bias)
    if kernel == dispatch.GROUPED_MM:
        return linear_grouped_mm(x, weight, bias)
    if kernel == dispatch.SLICES:
        return linear_into_slices(x, weight, bias)
    return linear_per_group(x, weight, bias, *_sizes(weight))


def bmm_bias(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """(groups, rows, in_g) x weight (groups, out_g, in_g)^T + bias: one batched GEMM, the bias fused."""
    if bias is None:
        return torch.bmm(a, weight.transpose(1, 2))
    return torch.baddbmm(bias.view(weight.shape[0], 1, -1), a, weight.transpose(1, 2))


def grouped_mm_bias(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The same product by ``torch._grouped_mm``, in the autocast dtype when autocast is on (it is not on
    autocast's lists), then the bias."""
    w_t = weight.transpose(1, 2)
    dtype = dispatch.autocast_dtype(a)
    if dtype is not None:
        a, w_t = a.to(dtype), w_t.to(dtype)
    elif w_t.dtype != a.dtype:
        w_t = w_t.to(a.dtype)
    y = torch._grouped_mm(a, w_t)
    return y if bias is None else y + bias.view(weight.shape[0], 1, -1).to(y.dtype)


GroupProduct = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def _linear_on_group_views(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           product: GroupProduct) -> torch.Tensor:
    groups, out_g, in_g = weight.shape
    lead = x.shape[:-1]
    y = product(x.reshape(-1, groups, in_g).transpose(0, 1), weight, bias)
    return y.transpose(0, 1).reshape(*lead, groups * out_g)


def linear_batched(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One batched GEMM: cuBLAS reads the (groups, tokens, in_g) view with leading dimension in_features."""
    return _linear_on_group_views(x, weight, bias, bmm_bias)


def linear_grouped_mm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One ``torch._grouped_mm`` (grouped GEMM kernels on recent GPUs) over the (groups, tokens, in_g) view, then
    the bias. No autograd."""
    return _linear_on_group_views(x, weight, bias, grouped_mm_bias)


def linear_into_slices(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """No autograd: each group's GEMM writes straight into its column slice of the output."""
    groups, out_g, in_g = weight.shape
    lead = x.shape[:-1]
    x2d = x.reshape(-1, groups * in_g)
    out = x2d.new_empty(x2d.shape[0], groups * out_g)
    for i in range(groups):
        torch.mm(x2d[:, i * in_g:(i + 1) * in_g], weight[i].t(), out=out[:, i * out_g:(i + 1) * out_g])
    if bias is not None:  # one pass at the end: broadcasting it into each strided slice (addmm) was slower
        out.add_(bias)
    return out.reshape(*lead, groups * out_g)


# --- NCHW block-diagonal 1x1 conv ------------------------------------------------------------------------

def block_diagonal_conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block-diagonal 1x1 convolution of NCHW ``x``: one broadcast batched GEMM eagerly (channels stay on dim
    1), one grouped convolution when traced."""
    if dispatch.tracing():
        return conv1x1_grouped(x, weight, bias, *_sizes(weight))
    groups, out_g, in_g = weight.shape
    b, _, h, w = x.shape
    y = torch.matmul(weight, x.reshape(b, groups, in_g, h * w))
    y = y.reshape(b, groups * out_g, h, w)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y
