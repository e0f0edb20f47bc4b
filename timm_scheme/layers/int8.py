"""int8 twins of the block-diagonal layers and of a fused SchemeMlp (inference only): ``Int8BlockDiagonalLinear``
/ ``Int8BlockDiagonalConv1x1`` (the ``torch._int_mm`` kernels), their ``DynamicInt8...`` twins (torch.ao's
dynamic int8 Linear per group) and ``Int8SchemeMlp``. ``integrations.quantize`` swaps them into a model."""
from __future__ import annotations

import warnings
from typing import Dict, Tuple, Type

import torch
from torch import nn

from ..kernels.dispatch import tracing
from ..kernels.int8 import (dynamic_block_diagonal_linear, dynamic_block_diagonal_mlp, dynamic_gemm_ok,
                            int8_block_diagonal_linear, int8_block_diagonal_mlp, quantize_per_row)
from .block_diagonal import BlockDiagonalConv1x1, BlockDiagonalLinear
from .mlp import SchemeMlp


def quantize_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(groups, out_g, in_g) float weights -> int8 weights of that shape and float32 scales (groups, out_g):
    one symmetric scale per group and output channel, the rule ``quantize_per_row`` applies to activations."""
    q, scale = quantize_per_row(weight.detach())
    return q, scale.squeeze(-1)


class Int8BlockDiagonalLinear(nn.Module):
    """int8 form of :class:`~timm_scheme.layers.BlockDiagonalLinear` (channels-last input, inference only).

    Buffers: ``weight_int8`` (groups, out_features // groups, in_features // groups), ``weight_scale``
    (groups, out_features // groups) and the float ``bias``; weight ~ weight_int8 * weight_scale[..., None].
    The input is quantized per token and group at every call (dynamic quantization: no calibration)."""
    _FLOAT = BlockDiagonalLinear

    def __init__(self, in_features: int, out_features: int, groups: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        if groups < 1 or in_features % groups or out_features % groups:
            raise ValueError(f"{type(self).__name__}: groups={groups} must divide in_features={in_features} and "
                             f"out_features={out_features}")
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        shape = (groups, out_features // groups, in_features // groups)
        self.register_buffer("weight_int8", torch.zeros(shape, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(shape[:2], dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.float32, device=device)
                             if bias else None)

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> "Int8BlockDiagonalLinear":
        """The int8 twin of a float block-diagonal layer (torch.ao's ``from_float`` convention; the scales are
        always computed from the weights, so ``use_precomputed_fake_quant`` changes nothing)."""
        if not isinstance(mod, cls._FLOAT):
            raise TypeError(f"{cls.__name__}.from_float expects a {cls._FLOAT.__name__}, got {type(mod).__name__}")
        qconfig = getattr(mod, "qconfig", None)  # set by torch.ao's quantize_dynamic
        if qconfig is not None and qconfig.weight is not None and qconfig.weight().dtype != torch.qint8:
            raise ValueError(f"{cls.__name__}: only int8 weights are supported, the qconfig asks for "
                             f"{qconfig.weight().dtype}")
        new = cls(mod.in_features, mod.out_features, mod.groups, bias=mod.bias is not None,
                  device=mod.weight.device, dtype=mod.weight.dtype)
        with torch.no_grad():
            qweight, scale = quantize_weight(mod.weight)
            new.weight_int8.copy_(qweight)
            new.weight_scale.copy_(scale)
            if mod.bias is not None:
                new.bias.copy_(mod.bias)
        return new

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale.float().unsqueeze(-1)

    def dequantize(self) -> nn.Module:
        """The float layer with the dequantized weights (what this layer computes, up to activation rounding)."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        mod = self._FLOAT(self.in_features, self.out_features, self.groups, bias=self.bias is not None,
                          device=self.weight_int8.device, dtype=dtype)
        with torch.no_grad():
            mod.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                mod.bias.copy_(self.bias)
        return mod

    to_float = dequantize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_block_diagonal_linear(x, self.weight_int8, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}, "
                f"bias={self.bias is not None}, int8 weights per group and channel, int8 activations per token "
                f"and group")


class Int8BlockDiagonalConv1x1(Int8BlockDiagonalLinear):
    """int8 form of :class:`~timm_scheme.layers.BlockDiagonalConv1x1` (NCHW input): the linear kernel on the
    channels-last view, each pixel a token."""
    _FLOAT = BlockDiagonalConv1x1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_block_diagonal_linear(x.permute(0, 2, 3, 1), self.weight_int8, self.weight_scale, self.bias)
        return y.permute(0, 3, 1, 2).contiguous()  # NCHW-contiguous, like the float layer's output


class DynamicInt8BlockDiagonalLinear(Int8BlockDiagonalLinear):
    """The torch.ao route's int8 block-diagonal layer: the int8 weights of :class:`Int8BlockDiagonalLinear`,
    and each group's product is torch.ao's dynamic int8 Linear (``torch.ops.quantized.linear_dynamic``: the
    group's input quantized per call, asymmetric and 7-bit as torch.ao's Linear does; GEMM and rescale fused
    in C++). CPU only, like torch.ao's Linear; elsewhere it runs its parent's ``torch._int_mm`` kernel."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed, self._packed_key = None, None

    def __getstate__(self):
        state = super().__getstate__().copy()  # packed weights are rebuilt from the buffers, not copied
        state["_packed"], state["_packed_key"] = None, None
        return state

    def packed_groups(self) -> list:
        """One packed int8 weight (and float bias) per group, built from the buffers on first use and again
        whenever they change (loaded, moved or written)."""
        tensors = [t for t in (self.weight_int8, self.weight_scale, self.bias) if t is not None]
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if key != self._packed_key:
            self._packed = [self._pack(i) for i in range(self.groups)]
            self._packed_key = key
        return self._packed

    def _pack(self, group: int):
        weight = self.weight_int8[group].cpu()
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        bias = None if self.bias is None else self.bias.float().cpu().chunk(self.groups)[group].contiguous()
        with warnings.catch_warnings():  # quantized tensors are announced deprecated; torch.ao's Linear uses them
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(
                weight, self.weight_scale[group].double().cpu(), zero_points, 0)
            return torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not dynamic_gemm_ok(x):
            return super().forward(x)
        return dynamic_block_diagonal_linear(x, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}, "
                f"bias={self.bias is not None}, int8 weights per group and channel, torch.ao's dynamic int8 "
                f"Linear per group")


class DynamicInt8BlockDiagonalConv1x1(DynamicInt8BlockDiagonalLinear):
    """int8 form of :class:`~timm_scheme.layers.BlockDiagonalConv1x1` for the torch.ao route (NCHW input)."""
    _FLOAT = BlockDiagonalConv1x1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()


INT8_MODULES: Dict[Type[nn.Module], Type[Int8BlockDiagonalLinear]] = {
    BlockDiagonalLinear: Int8BlockDiagonalLinear,
    BlockDiagonalConv1x1: Int8BlockDiagonalConv1x1,
}
# the torch.ao route's twins: torch.ao's dynamic int8 Linear per group
DYNAMIC_INT8_MODULES: Dict[Type[nn.Module], Type[DynamicInt8BlockDiagonalLinear]] = {
    BlockDiagonalLinear: DynamicInt8BlockDiagonalLinear,
    BlockDiagonalConv1x1: DynamicInt8BlockDiagonalConv1x1,
}


class Int8SchemeMlp(SchemeMlp):
    """A fused SchemeMlp whose projections are int8 layers: its eager forward runs ``int8_block_diagonal_mlp``
    (the float kernels read float weights the int8 layers do not have); ``convert_int8_mixers`` makes them."""

    def int8_kernel_ok(self) -> bool:
        """What ``fused_kernel_ok`` asks of the float kernel (nothing between the projections that mixes groups,
        draws random numbers or writes in place), with int8 projections instead of float ones."""
        return all(isinstance(m, Int8BlockDiagonalLinear) for m in (self.fc1, self.fc2)) and self.hidden_is_per_group()

    def bd_mlp(self, x: torch.Tensor) -> torch.Tensor:
        if tracing() or torch.jit.is_scripting() or not self.int8_kernel_ok():
            return self.drop2(self.fc2(self.fc2_input(x)))  # layer by layer, through the modules
        dynamic = all(isinstance(m, DynamicInt8BlockDiagonalLinear) for m in (self.fc1, self.fc2))
        kernel = dynamic_block_diagonal_mlp if dynamic and dynamic_gemm_ok(x) else int8_block_diagonal_mlp
        if self.use_conv:  # NCHW: the token kernel on the channels-last view, like the int8 conv layers
            y = kernel(x.permute(0, 2, 3, 1), self.fc1, self.fc2, self.group_hidden, self.channel_shuffle)
            return self.drop2(y.permute(0, 3, 1, 2).contiguous())
        return self.drop2(kernel(x, self.fc1, self.fc2, self.group_hidden, self.channel_shuffle))
