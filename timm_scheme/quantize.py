"""int8 inference of fused SCHEME models.

``Int8BlockDiagonalLinear`` / ``Int8BlockDiagonalConv1x1`` hold symmetric int8 weights, one scale per group and
output channel, and quantize their input at run time, one scale per token and group; each group's product is an
int8 x int8 -> int32 GEMM (``torch._int_mm``), rescaled to float. Their ``DynamicInt8...`` twins keep the same
weights and run torch.ao's dynamic int8 Linear on each group (per-call activation scales, the steps around the
GEMM fused in C++: the faster form on CPU). Two ways in, for the two quantization stacks:

    model = timm_scheme.quantize.quantize_dynamic_int8(fused)   # torch.ao.quantization.quantize_dynamic (Dynamic...)
    timm_scheme.quantize.quantize_int8(fused)                   # torchao.quantize_, in place

Both also quantize the model's nn.Linear layers (torch.ao's dynamic Linear, torchao's
Int8DynamicActivationInt8WeightConfig) and refuse a model whose mixers still hold their CCA branch.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Type

import torch
from torch import nn

from .kernels.dispatch import tracing
from .layers import BlockDiagonalConv1x1, BlockDiagonalLinear, SchemeMlp
from .mixers import scheme_mixers

QMAX = 127  # symmetric range [-127, 127]: products of two values stay below 2**14, negation is exact
# smallest |x| a scale is computed from: keeps QMAX / amax finite; an all-zero token quantizes to zeros
_MIN_AMAX = 1e-30
# the intermediates of one token tile of the CPU kernels (int32 and float hidden tiles), kept well inside the
# last-level cache; the size was measured (benchmarks/results/NOTES.md)
TILE_BYTES = 6 << 20


# --- int8 arithmetic --------------------------------------------------------------------------------------

def quantize_per_row(x: torch.Tensor, dims=(-1,), inplace: bool = False,
                     out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of ``x`` (any strides) with one scale per slice over ``dims``.

    Returns ``(q, scale)``: q is int8 of ``x``'s shape (contiguous, or ``out``, a view of any strides, when
    given), scale float32 with ``dims`` kept as size 1, and ``x ~ q * scale``: ``q = round(x * (127 / amax))``
    (ties to even), ``scale = amax / 127``, amax the slice's largest magnitude. ``inplace`` lets it overwrite
    float32 ``x`` (a scratch tile) instead of allocating a temporary."""
    x = x.float()
    if math.prod(x.shape[d] for d in dims) >= 128:
        # two reductions beat abs() + amax on long slices (no temporary the size of x)
        amax = torch.maximum(x.amax(dims, keepdim=True), x.amin(dims, keepdim=True).neg_())
    else:  # a reduction costs about as much per slice as per element on short ones: one reduction, not two
        amax = x.abs().amax(dims, keepdim=True)
    amax.clamp_min_(_MIN_AMAX)  # (torch.aminmax is slower than either on CPU)
    scaled = x.mul_(QMAX / amax) if inplace else torch.mul(x, QMAX / amax)
    # |scaled| <= 127 up to rounding by construction, so the cast needs no clamp
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device) if out is None else out
    q.copy_(scaled.round_())
    return q, amax.div_(QMAX)


def _quantize_groups(x2d: torch.Tensor, groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows, groups * k) -> int8 (groups, rows, k), each group's block contiguous for its GEMM, and scales
    (groups, rows, 1): reduced along the contiguous channels, transposed by the int8 copy."""
    rows = x2d.shape[0]
    q = torch.empty(groups, rows, x2d.shape[1] // groups, dtype=torch.int8, device=x2d.device)
    _, scale = quantize_per_row(x2d.view(rows, groups, -1), out=q.transpose(0, 1))
    return q, scale.transpose(0, 1)


def _cpu_int_mm() -> bool:
    # aten's CPU _int_mm arrived in torch 2.3 (any shape, any strides)
    return hasattr(torch, "_int_mm") and torch.torch_version.TorchVersion(torch.__version__) >= (2, 3)


_CPU_INT_MM = _cpu_int_mm()


def int_mm_supported(m: int, k: int, n: int, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` takes an (m, k) x (k, n) int8 product on ``device``: CUDA (cuBLASLt) needs
    m > 16 and k, n positive multiples of 8; the CPU kernel takes any shape."""
    if device.type == "cpu":
        return _CPU_INT_MM
    if device.type == "cuda":
        return m > 16 and k > 0 and n > 0 and k % 8 == 0 and n % 8 == 0
    return False


def int8_mm(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact ``a @ b`` of int8 matrices into int32 ``out``: ``torch._int_mm`` where it applies, else a float
    matmul that is exact at this depth (float32 while k * 128**2 < 2**24, else float64)."""
    m, k = a.shape
    n = b.shape[1]
    if int_mm_supported(m, k, n, a.device):
        return torch._int_mm(a, b) if out is None else torch._int_mm(a, b, out=out)
    dtype = torch.float32 if k * 128 * 128 < 2 ** 24 else torch.float64
    exact = torch.mm(a.to(dtype), b.to(dtype))
    return exact.to(torch.int32) if out is None else out.copy_(exact)


def _grouped_int8_mm(q: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """(groups, rows, k) int8 x (groups, k, n) int8 -> (groups, rows, n) int32, one GEMM per group."""
    acc = torch.empty(q.shape[0], q.shape[1], w_t.shape[2], dtype=torch.int32, device=q.device)
    for i in range(q.shape[0]):
        int8_mm(q[i], w_t[i], out=acc[i])
    return acc


def _rescale(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
             out: torch.Tensor) -> torch.Tensor:
    """out = acc * x_scale (per group and row) * w_scale (per group and column) + bias, all groups at once
    ((groups, rows, n) shapes, ``out`` any strides), three passes. The layer and the fused MLP both rescale
    through here, so they give the same bits."""
    out.copy_(acc)
    out.mul_(x_scale)
    if bias is None:
        return out.mul_(w_scale)
    return torch.addcmul(bias, out, w_scale, out=out)


def _tile(tokens: int, width: int, device: torch.device) -> int:
    """Tokens per tile when the tile's intermediates take ``width`` floats per token. CPU: ``TILE_BYTES``, so
    they stay in cache and every op still has hundreds of rows; elsewhere one tile (fewer launches, and
    cuBLASLt's int8 GEMM needs more than 16 rows)."""
    if device.type != "cpu":
        return max(tokens, 1)
    tiles = -(-tokens // max(64, TILE_BYTES // (4 * width)))
    return max(1, -(-tokens // tiles))  # tiles of equal size: no short last tile paying the per-op overhead


@torch.no_grad()  # inference only: int8 GEMMs have no gradient
def int8_block_diagonal_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block-diagonal linear of channels-last ``x`` (..., in_features) with int8 weights (groups, out_g, in_g)
    and their scales (groups, out_g); ``x`` is quantized per token and group. Returns ``x.dtype``."""
    groups, out_g, _ = qweight.shape
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    tokens = x2d.shape[0]
    out = torch.empty(tokens, groups * out_g, dtype=torch.float32, device=x.device)
    tile = _tile(tokens, groups * out_g + x2d.shape[1], x.device)
    w_t = qweight.transpose(1, 2)  # (groups, in_g, out_g) views: the column-major B cuBLASLt wants
    w_scale = w_scale.float().unsqueeze(1)
    b = bias.float().view(groups, 1, out_g) if bias is not None else None
    for start in range(0, tokens, tile):
        q, x_scale = _quantize_groups(x2d[start:start + tile], groups)
        out_t = out[start:start + tile]
        _rescale(_grouped_int8_mm(q, w_t), x_scale, w_scale, b, out_t.view(-1, groups, out_g).transpose(0, 1))
    return out.to(x.dtype).reshape(*lead, groups * out_g)


@torch.no_grad()  # inference only: int8 GEMMs have no gradient
def int8_block_diagonal_mlp(x: torch.Tensor, fc1: "Int8BlockDiagonalLinear", fc2: "Int8BlockDiagonalLinear",
                            hidden_fn, shuffle: bool = False) -> torch.Tensor:
    """fc2(hidden_fn(fc1(x))) for channels-last ``x``, one token tile at a time, so the hidden activations
    (int32, float, int8) stay in cache: computes what the two int8 layers compute one after the other, with
    the same bits. ``hidden_fn`` acts on fc1's output as (groups, rows, fc1_out // groups), each group's
    channels last, and may overwrite it; ``shuffle`` feeds fc2 through ``kernels.shuffle_channels``."""
    groups, fc1_g, _ = fc1.weight_int8.shape
    out_g = fc2.weight_int8.shape[1]
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    tokens = x2d.shape[0]
    out = torch.empty(tokens, groups * out_g, dtype=torch.float32, device=x.device)
    tile = _tile(tokens, 2 * groups * fc1_g, x.device)
    w1_t, w2_t = fc1.weight_int8.transpose(1, 2), fc2.weight_int8.transpose(1, 2)
    s1, s2 = fc1.weight_scale.float().unsqueeze(1), fc2.weight_scale.float().unsqueeze(1)
    b1 = fc1.bias.float().view(groups, 1, fc1_g) if fc1.bias is not None else None
    b2 = fc2.bias.float().view(groups, 1, out_g) if fc2.bias is not None else None
    for start in range(0, tokens, tile):
        x_t = x2d[start:start + tile]
        rows = x_t.shape[0]
        q, x_scale = _quantize_groups(x_t, groups)
        acc = _grouped_int8_mm(q, w1_t)
        pre = torch.empty(acc.shape, dtype=torch.float32, device=x.device)
        hid = hidden_fn(_rescale(acc, x_scale, s1, b1, pre))
        dims = (-1,)
        if shuffle:  # fc2 group j reads chunk j of every fc1 group i: (i, rows, j, c) -> (j, rows, i, c)
            hid, dims = hid.view(groups, rows, groups, -1).permute(2, 1, 0, 3), (-2, -1)
        hq, h_scale = quantize_per_row(hid, dims, inplace=True)
        if shuffle:
            hq, h_scale = hq.flatten(2), h_scale.flatten(2)
        out_t = out[start:start + tile].view(rows, groups, out_g).transpose(0, 1)
        _rescale(_grouped_int8_mm(hq, w2_t), h_scale, s2, b2, out_t)
    return out.to(x.dtype).reshape(*lead, groups * out_g)


# --- modules ------------------------------------------------------------------------------------------------

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


# --- torch.ao's dynamic int8 Linear, one per group ----------------------------------------------------------

def dynamic_gemm_ok(x: torch.Tensor) -> bool:
    """torch.ao's dynamic int8 Linear op runs on ``x``: a CPU tensor and a quantized engine (fbgemm / x86,
    onednn or qnnpack), as for torch.ao's own dynamic Linear."""
    return x.device.type == "cpu" and torch.backends.quantized.engine != "none"


def _linear_dynamic(x: torch.Tensor, packed) -> torch.Tensor:
    # reduce_range=True: what torch.ao's dynamic Linear passes (7-bit activations on x86, so no int16
    # accumulation in fbgemm's kernels saturates)
    return torch.ops.quantized.linear_dynamic(x, packed, True)


@torch.no_grad()
def dynamic_block_diagonal_linear(x: torch.Tensor, layer: "DynamicInt8BlockDiagonalLinear") -> torch.Tensor:
    """Channels-last ``x`` through ``layer``: each group's slice through torch.ao's dynamic int8 Linear."""
    packed = layer.packed_groups()
    y = torch.cat([_linear_dynamic(xi, p) for xi, p in zip(x.float().chunk(layer.groups, -1), packed)], -1)
    return y.to(x.dtype)


@torch.no_grad()
def dynamic_block_diagonal_mlp(x: torch.Tensor, fc1: "DynamicInt8BlockDiagonalLinear",
                               fc2: "DynamicInt8BlockDiagonalLinear", hidden_fn, shuffle: bool = False) -> torch.Tensor:
    """fc2(hidden_fn(fc1(x))) for channels-last ``x``, group by group, so one group's hidden activations are
    alive at a time (all of them with ``shuffle``, where fc2 group j reads chunk j of every fc1 group): the
    same bits as the two layers one after the other. ``hidden_fn`` acts on one group's (rows, fc1_out //
    groups) slice of fc1's output and may overwrite it."""
    groups = fc1.groups
    p1, p2 = fc1.packed_groups(), fc2.packed_groups()
    x2d = x.reshape(-1, x.shape[-1]).float()
    if shuffle:
        hidden = [hidden_fn(_linear_dynamic(xi, p)) for xi, p in zip(x2d.chunk(groups, -1), p1)]
        pieces = [h.chunk(groups, -1) for h in hidden]
        outs = [_linear_dynamic(torch.cat([piece[j] for piece in pieces], -1), p2[j]) for j in range(groups)]
    else:
        outs = [_linear_dynamic(hidden_fn(_linear_dynamic(xi, a)), b)
                for xi, a, b in zip(x2d.chunk(groups, -1), p1, p2)]
    return torch.cat(outs, -1).to(x.dtype).reshape(*x.shape[:-1], -1)


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


# --- whole models -------------------------------------------------------------------------------------------

def check_fused(model: nn.Module) -> None:
    """Raise ValueError naming the first SCHEME mixer that still holds its CCA branch."""
    for name, mixer in scheme_mixers(model).items():
        if mixer.has_cca:
            raise ValueError(
                f"int8 quantization: SCHEME mixer {name or type(model).__name__!r} still has its CCA branch (the "
                "model is not fused); call timm_scheme.fuse_for_inference(model) first, then quantize")


def convert_int8_mixers(model: nn.Module) -> int:
    """Make every SchemeMlp holding an int8 projection an ``Int8SchemeMlp`` (in place), so that it runs its
    int8 layers; the helpers below call it, call it yourself after your own quantize_dynamic / quantize_ with
    ``INT8_MODULES``. Returns how many mixers it converted."""
    converted = 0
    for name, mixer in scheme_mixers(model).items():
        if type(mixer) is not SchemeMlp or not any(isinstance(m, Int8BlockDiagonalLinear)
                                                   for m in (mixer.fc1, mixer.fc2)):
            continue  # converted already, or an adapted mixer (its family's forward calls the int8 layers)
        if mixer.has_cca:
            raise ValueError(f"convert_int8_mixers: {name!r} still has its CCA branch; fuse before quantizing")
        mixer.__class__ = Int8SchemeMlp  # same state, the int8-aware forward; still a SchemeMlp
        converted += 1
    return converted


def quantize_dynamic_int8(model: nn.Module, *, linear: bool = True, inplace: bool = False) -> nn.Module:
    """torch.ao route: ``torch.ao.quantization.quantize_dynamic`` with the block-diagonal layers mapped to
    ``DYNAMIC_INT8_MODULES`` (torch.ao's dynamic int8 Linear per group) and (``linear=True``) nn.Linear to
    torch.ao's dynamic int8 Linear (fbgemm/onednn, CPU only: per-tensor activation scales). Returns the quantized model, a copy unless ``inplace`` (torch.ao's
    convention). torch.ao.quantization is deprecated in favour of torchao: see ``quantize_int8``."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
    from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings

    check_fused(model)
    qconfig_spec = {kind: default_dynamic_qconfig for kind in DYNAMIC_INT8_MODULES}
    mapping = {**get_default_dynamic_quant_module_mappings(), **DYNAMIC_INT8_MODULES}
    if linear:
        qconfig_spec[nn.Linear] = default_dynamic_qconfig
    model = quantize_dynamic(model, qconfig_spec=qconfig_spec, mapping=mapping, inplace=inplace)
    convert_int8_mixers(model)
    return model


def is_block_diagonal(module: nn.Module, fqn: str = "") -> bool:
    """``filter_fn`` for torchao's ``quantize_``: the float block-diagonal layers."""
    return type(module) in INT8_MODULES


def _swap_block_diagonal(module: nn.Module, config) -> nn.Module:
    kind = INT8_MODULES.get(type(module))
    if kind is None:
        raise TypeError(f"BlockDiagonalInt8Config applies to {[t.__name__ for t in INT8_MODULES]}, got "
                        f"{type(module).__name__}: pass filter_fn=timm_scheme.quantize.is_block_diagonal")
    return kind.from_float(module)


@functools.lru_cache(maxsize=None)
def _torchao_config() -> type:
    # built on first use: importing torchao costs about half a second and logs a warning, which every
    # `import timm_scheme` would otherwise pay
    try:
        from torchao.core.config import AOBaseConfig
        from torchao.quantization.transform_module import register_quantize_module_handler
    except ImportError as err:
        raise ImportError("int8 quantization through torchao needs torchao: pip install torchao") from err

    @dataclass
    class BlockDiagonalInt8Config(AOBaseConfig):
        """torchao workflow config: swap BlockDiagonalLinear / BlockDiagonalConv1x1 for their int8 twins
        (int8 weights per group and channel, dynamic int8 activations per token and group). Use it with
        ``quantize_(model, BlockDiagonalInt8Config(), filter_fn=is_block_diagonal)``."""

    BlockDiagonalInt8Config.__module__ = __name__  # pickles by name, through the module __getattr__ below
    BlockDiagonalInt8Config.__qualname__ = "BlockDiagonalInt8Config"
    register_quantize_module_handler(BlockDiagonalInt8Config)(_swap_block_diagonal)
    return BlockDiagonalInt8Config


def __getattr__(name: str):
    if name == "BlockDiagonalInt8Config":
        return _torchao_config()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def quantize_int8(model: nn.Module, *, linear: bool = True) -> nn.Module:
    """torchao route, in place (``quantize_``'s convention): torchao's ``Int8DynamicActivationInt8WeightConfig``
    on the nn.Linear layers (``linear=True``; int8 weights per channel, int8 activations per token) and
    ``BlockDiagonalInt8Config`` on the block-diagonal ones. Returns ``model``.

    The nn.Linear config is made with ``set_inductor_config=False``: torchao's default would change the global
    inductor settings as a side effect of quantizing; call torchao.quantization.utils.
    recommended_inductor_config_setter() yourself before torch.compile."""
    check_fused(model)
    config = _torchao_config()()  # first: says how to install torchao when it is missing
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    if linear:  # torchao's default filter: nn.Linear layers whose weight it has not quantized yet
        quantize_(model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    quantize_(model, config, filter_fn=is_block_diagonal)
    convert_int8_mixers(model)
    return model


# BlockDiagonalInt8Config is left out: a star import would import torchao
__all__ = [
    "Int8BlockDiagonalLinear", "Int8BlockDiagonalConv1x1", "Int8SchemeMlp",
    "quantize_dynamic_int8", "quantize_int8", "convert_int8_mixers", "check_fused", "is_block_diagonal",
    "INT8_MODULES", "DYNAMIC_INT8_MODULES", "DynamicInt8BlockDiagonalLinear", "DynamicInt8BlockDiagonalConv1x1",
    "dynamic_block_diagonal_linear", "dynamic_block_diagonal_mlp", "quantize_per_row", "quantize_weight", "int8_mm", "int_mm_supported",
    "int8_block_diagonal_linear", "int8_block_diagonal_mlp",
]
