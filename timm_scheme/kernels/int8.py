"""int8 kernels of the block-diagonal layers, inference only: symmetric per-row quantization, the exact int8 GEMM
(``torch._int_mm`` or an exact float fallback), the per-token-tile layer and fused-MLP kernels, and the
torch.ao route's per-group dynamic int8 Linear. Functions of int8 weights and scales; the modules that hold
them are in ``layers.int8``."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

QMAX = 127  # symmetric range [-127, 127]: products of two values stay below 2**14, negation is exact
# smallest |x| a scale is computed from: keeps QMAX / amax finite; an all-zero token quantizes to zeros
_MIN_AMAX = 1e-30
# the intermediates of one token tile of the CPU kernels (int32 and float hidden tiles), kept well inside the
# last-level cache; the size was measured (benchmarks/results/NOTES.md)
TILE_BYTES = 6 << 20


# --- int8 arithmetic -----------------------------------------------------------------------------------------

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


# --- torch.ao's dynamic int8 Linear, one per group -----------------------------------------------------------

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
