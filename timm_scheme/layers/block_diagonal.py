""" Block-diagonal projections: `groups` independent dense maps, one per contiguous channel group.

Weights are stored as (groups, out_features // groups, in_features // groups).

Kernels, chosen per call. Measured side by side on a shared 2-core AVX-512 CPU, fp32, DeiT-Tiny sizes
(batch 32 x 197 tokens, C=192, g=4, E=8); `python -m benchmarks.run` reproduces the tables.
* Whole BD-MLP, CPU, no autograd (`block_diagonal_mlp`): token tiles; per tile and group one GEMM into a
  reused hidden buffer, the activation in place, one GEMM straight into the group's column slice of the
  output; tile size by thread count (`_TILE_BYTES_PER_THREAD`). 1.3-1.4x the dense E=4 MLP on 2 threads,
  1.5-2.1x on 1 thread; a per-group F.linear->GELU->F.linear + cat ran 0.7-1.2x (with the GELU in
  place: 0.80-0.93x the tiled kernel on 1 thread, alike on 2 quiet threads), two batched GEMMs on a
  (groups, tokens, width) view 0.4-0.7x untiled (1.2-1.6x tiled), `torch._grouped_mm` (CPU fp32)
  0.4-0.5x, oneDNN linear+GELU per tile no faster, the grouped 1x1 Conv2d of the paper's code 0.3-0.4x.
* Whole BD-MLP, CPU, autograd: an autograd.Function running per group GEMM -> act -> GEMM into the
  output's column slice, whose backward writes each group's input gradient into its slice and reuses
  hidden-sized scratch buffers (`_PerGroupBlockDiagonalMlp`): 0.91x the time (per-round range 0.83-1.03,
  1 thread, CPU time) of the autograd-native per group F.linear->act->F.linear + cat, which ran 0.84-1.0x
  the dense E=4 forward+backward; the same bare ops on contiguous buffers (the attainable bound, see the
  benchmark's training "Attainable" table) take 0.82x the dense bare ops, not the 0.5x of the MACs (fc1's
  K = C/g GEMM runs at the dense GEMM's cost, GELU and its backward touch E=8's twice wider hidden). A tiled
  Function that recomputes the hidden tiles in backward keeps no hidden activations (opt-in:
  `recompute=True`, 0.9-1.0x dense); batched GEMMs 1.2-1.6x.
* Single projections, CPU: without autograd each group's GEMM writes into its slice of the output, the
  bias added once (0.8-0.9x a dense GEMM of equal FLOPs and equal output size; the rest is four
  GEMMs of N/4 columns instead of one); with autograd one F.linear per group + cat.
* NCHW (MetaFormer conv stages): the fused MLP runs the token kernel on a channels-last copy (1.7-2.6x
  the dense 1x1-conv MLP on 1 thread, vs 1.2-1.6x for NCHW tiling); a single 1x1 projection stays one
  broadcast batched matmul (transposing its wide hidden side costs more than it saves).
* CUDA and other devices (not measured here): batched GEMMs over strided (groups, tokens, width) views,
  which cuBLAS reads in place: one launch per projection.
* torch.compile and autocast get the plain per-group form, which they trace and cast as usual.
"""
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

# Token tiles of the fused MLP hold one group's hidden activations. The point is not L2 residency but never
# allocating the whole (tokens, hidden) tensor, which at E=8 exceeds glibc's mmap threshold and page-faults
# on every call; the size is picked by thread count. Measured on a 2-core AVX-512 CPU (DeiT-Tiny MLP, batch
# 32 = 6304 tokens, hidden tile 384 wide, interleaved rounds; benchmarks/results/NOTES.md, 2026-11-24):
# * 1 thread (CPU time): 8 MiB tiles (2 tiles here) 1.5-1.8x the dense E=4 MLP; one 32 MiB tile 0.93-0.95x
#   of that; per-group F.linear -> GELU in place -> F.linear + cat 0.80-0.93x of it.
# * 2 threads, quiet machine (wall time): 8 MiB and 32 MiB tiles alike (1.34x and 1.39x dense, 1.01 per
#   round; 0.997 at batch 64), per-group + cat 0.97x of them at batch 32 and 0.61x at batch 64.
# * 2 threads with another job on a core: every GEMM is a parallel region ending in a barrier that waits
#   ~10 ms for a preempted thread, so the time followed the number of regions: 26 with two 8 MiB tiles
#   (270 ms), 13 with one 32 MiB tile (137 ms), per-group + cat 13 plus allocations and the cat (190 ms);
#   dense MLP 70 ms.
# Hence 8 MiB on 1 thread and 16 MiB per thread from 2 threads on (one tile up to ~22k tokens on 2 threads).
_TILE_BYTES_PER_THREAD = 16 << 20
_MIN_TILE_TOKENS = 64


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _cpu_kernels(x: torch.Tensor) -> bool:
    """The hand-tiled CPU kernels: eager CPU only (torch.compile gets the plain, traceable form)."""
    return x.device.type == 'cpu' and not _compiling()


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


# --- channels-last block-diagonal linear -----------------------------------------------------------------

def block_diagonal_linear(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y[..., group i] = x[..., group i] @ weight[i].T + bias[group i], with weight (groups, out_g, in_g)."""
    if weight.shape[0] == 1:
        return F.linear(x, weight[0], bias)
    if x.device.type != 'cpu':
        return _linear_batched(x, weight, bias)
    if not _compiling() and not _needs_grad(x, weight, bias) and _autocast_dtype(x) is None:
        return _linear_into_slices(x, weight, bias)
    return _linear_per_group(x, weight, bias)


def _linear_per_group(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One F.linear per group on a strided view of x, then cat: autograd- and torch.compile-native."""
    groups, out_g, in_g = weight.shape
    bias_g = bias.view(groups, out_g).unbind(0) if bias is not None else (None,) * groups
    outs = [F.linear(x[..., i * in_g:(i + 1) * in_g], weight[i], bias_g[i]) for i in range(groups)]
    return torch.cat(outs, dim=-1)


def _linear_batched(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One batched GEMM: cuBLAS reads the (groups, tokens, in_g) view with leading dimension in_features."""
    groups, out_g, in_g = weight.shape
    lead = x.shape[:-1]
    xg = x.reshape(-1, groups, in_g).transpose(0, 1)
    if bias is None:
        y = torch.bmm(xg, weight.transpose(1, 2))
    else:
        y = torch.baddbmm(bias.view(groups, 1, out_g), xg, weight.transpose(1, 2))
    return y.transpose(0, 1).reshape(*lead, groups * out_g)


def _linear_into_slices(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
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

def block_diagonal_conv1x1(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Block-diagonal 1x1 convolution of an NCHW tensor, weight (groups, out_g, in_g)."""
    groups, out_g, in_g = weight.shape
    b, _, h, w = x.shape
    # (groups, out_g, in_g) @ (B, groups, in_g, H*W): one batched GEMM, channels stay on dim 1
    y = torch.matmul(weight, x.reshape(b, groups, in_g, h * w))
    y = y.reshape(b, groups * out_g, h, w)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y


# --- fused, token-tiled block-diagonal MLP ---------------------------------------------------------------

HiddenFn = Callable[[torch.Tensor], torch.Tensor]


def _tile_bytes() -> int:
    threads = torch.get_num_threads()
    return _TILE_BYTES_PER_THREAD // 2 if threads <= 1 else _TILE_BYTES_PER_THREAD * min(threads, 8)


def _tile_tokens(hidden_g: int, itemsize: int) -> int:
    tile = _tile_bytes() // max(1, hidden_g * itemsize)
    return max(_MIN_TILE_TOKENS, tile // _MIN_TILE_TOKENS * _MIN_TILE_TOKENS)


def _mm_bias(x: torch.Tensor, w_t: torch.Tensor, bias: Optional[torch.Tensor], out=None) -> torch.Tensor:
    if bias is None:
        return torch.mm(x, w_t, out=out) if out is not None else torch.mm(x, w_t)
    return torch.addmm(bias, x, w_t, out=out) if out is not None else torch.addmm(bias, x, w_t)


def _mlp_tokens_forward(x2d, w1, b1, w2, b2, hidden_fn: HiddenFn) -> torch.Tensor:
    """fc2(hidden_fn(fc1(x))) for (tokens, channels) input, tile by tile and group by group, no autograd."""
    groups, fc1_g, in_g = w1.shape
    out_g = w2.shape[1]
    tokens = x2d.shape[0]
    out = x2d.new_empty(tokens, groups * out_g)
    tile = _tile_tokens(fc1_g, x2d.element_size())
    w1_t, w2_t = w1.transpose(1, 2), w2.transpose(1, 2)
    b1_g = b1.view(groups, fc1_g) if b1 is not None else None
    buf = x2d.new_empty(min(tile, tokens), fc1_g)
    for start in range(0, tokens, tile):
        x_t = x2d[start:start + tile]
        pre = buf[:x_t.shape[0]]
        out_t = out[start:start + tile]
        for i in range(groups):
            _mm_bias(x_t[:, i * in_g:(i + 1) * in_g], w1_t[i], b1_g[i] if b1_g is not None else None, out=pre)
            torch.mm(hidden_fn(pre), w2_t[i], out=out_t[:, i * out_g:(i + 1) * out_g])
        if b2 is not None:  # once per tile, while it is in cache (cheaper than per strided group slice)
            out_t.add_(b2)
    return out


class _TiledBlockDiagonalMlp(torch.autograd.Function):
    """Training form of the tiled kernel: saves only the input and recomputes each hidden tile in backward
    (cache-resident, one extra fc1 GEMM), so the (tokens, hidden) activations are never materialised."""

    @staticmethod
    def forward(ctx, x2d, w1, b1, w2, b2, hidden_fn, *act_params):
        ctx.hidden_fn = hidden_fn
        ctx.save_for_backward(x2d, w1, b1, w2, b2, *act_params)
        return _mlp_tokens_forward(x2d, w1, b1, w2, b2, hidden_fn)

    @staticmethod
    def backward(ctx, grad_out):
        x2d, w1, b1, w2, b2, *act_params = ctx.saved_tensors
        hidden_fn = ctx.hidden_fn
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        groups, fc1_g, in_g = w1.shape
        out_g = w2.shape[1]
        tokens = x2d.shape[0]
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x2d) if need_x else None
        grad_w1 = torch.zeros_like(w1) if need_w1 else None
        grad_w2 = torch.zeros_like(w2) if need_w2 else None
        grad_b1 = torch.zeros(groups, fc1_g, dtype=w1.dtype, device=w1.device) if need_b1 else None
        grad_b2 = grad_out.sum(0) if need_b2 else None
        act_live = [p for p, need in zip(act_params, ctx.needs_input_grad[6:]) if need]
        grad_act = [torch.zeros_like(p) for p in act_live]
        w1_t = w1.transpose(1, 2)
        b1_g = b1.view(groups, fc1_g) if b1 is not None else None
        tile = _tile_tokens(fc1_g, x2d.element_size())
        buf = x2d.new_empty(min(tile, tokens), fc1_g)
        for start in range(0, tokens, tile):
            x_t = x2d[start:start + tile]
            g_t = grad_out[start:start + tile]
            for i in range(groups):
                x_i = x_t[:, i * in_g:(i + 1) * in_g]
                g_i = g_t[:, i * out_g:(i + 1) * out_g]
                pre = _mm_bias(x_i, w1_t[i], b1_g[i] if b1_g is not None else None, out=buf[:x_t.shape[0]])
                with torch.enable_grad():
                    pre_leaf = pre.detach().requires_grad_()
                    hid = hidden_fn(pre_leaf)
                grad_hid = torch.mm(g_i, w2[i])
                if need_w2:
                    grad_w2[i].addmm_(g_i.t(), hid.detach())
                grads = torch.autograd.grad(hid, [pre_leaf] + act_live, grad_hid)
                grad_pre = grads[0]
                for acc, g in zip(grad_act, grads[1:]):
                    acc.add_(g)
                if need_w1:
                    grad_w1[i].addmm_(grad_pre.t(), x_i)
                if need_b1:
                    grad_b1[i].add_(grad_pre.sum(0))
                if need_x:
                    torch.mm(grad_pre, w1[i], out=grad_x[start:start + tile, i * in_g:(i + 1) * in_g])
        grad_act_iter = iter(grad_act)
        grads_act = tuple(next(grad_act_iter) if need else None for need in ctx.needs_input_grad[6:])
        return (grad_x, grad_w1, grad_b1.view(-1) if grad_b1 is not None else None, grad_w2, grad_b2, None,
                *grads_act)


def _gelu_approximate(hid: torch.Tensor) -> Optional[str]:
    """If autograd recorded hidden_fn as a bare GELU of its input, GELU's `approximate` mode, else None."""
    node = hid.grad_fn
    if type(node).__name__ != 'GeluBackward0' or len(node.next_functions) != 1 \
            or type(node.next_functions[0][0]).__name__ != 'AccumulateGrad':
        return None
    return getattr(node, '_saved_approximate', None)  # a private autograd field: fall back when it is gone


class _PerGroupBlockDiagonalMlp(torch.autograd.Function):
    """Training form that keeps the hidden activations (CPU default): per group fc1 -> hidden_fn -> fc2 into
    the group's column slice of the output; backward writes each group's input gradient straight into its
    column slice and reuses one hidden-sized scratch buffer for all groups. Against the autograd-native
    per-group F.linear + cat it saves the cat, the slice backward (a zero-filled full-size input gradient per
    group, then their sum) and half the hidden-sized gradient allocations.

    Saves the input, each group's pre-activation and hidden units (what autograd would save, through the same
    saved-tensor hooks). A bare GELU (every timm ViT) is differentiated with aten's gelu_backward; any other
    hidden_fn (gates, activations with parameters) is re-run on the saved pre-activation in backward and
    differentiated by autograd."""

    @staticmethod
    def forward(ctx, x2d, w1, b1, w2, b2, hidden_fn, *act_params):
        groups, fc1_g, in_g = w1.shape
        out_g = w2.shape[1]
        out = x2d.new_empty(x2d.shape[0], groups * out_g)
        w1_t, w2_t = w1.transpose(1, 2), w2.transpose(1, 2)
        b1_g = b1.view(groups, fc1_g) if b1 is not None else None
        gelu_modes, hids, pres = [], [], []
        for i in range(groups):
            pre = _mm_bias(x2d[:, i * in_g:(i + 1) * in_g], w1_t[i], b1_g[i] if b1_g is not None else None)
            with torch.enable_grad():  # keeps hidden_fn out of place (pre is saved) and shows what it ran
                pre.requires_grad_()
                hid = hidden_fn(pre)
            pre = pre.detach()
            torch.mm(hid.detach(), w2_t[i], out=out[:, i * out_g:(i + 1) * out_g])
            gelu_modes.append(_gelu_approximate(hid) if hid.requires_grad else None)
            hids.append(hid.detach())
            pres.append(pre)
        if b2 is not None:
            out.add_(b2)
        ctx.hidden_fn = hidden_fn
        ctx.gelu_modes = gelu_modes
        ctx.n_act, ctx.groups = len(act_params), groups
        ctx.save_for_backward(x2d, w1, w2, *act_params, *hids, *pres)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x2d, w1, w2, *rest = ctx.saved_tensors
        n_act, groups = ctx.n_act, ctx.groups
        act_params, hids, pres = rest[:n_act], rest[n_act:n_act + groups], rest[n_act + groups:]
        hidden_fn = ctx.hidden_fn
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        act_live = [p for p, need in zip(act_params, ctx.needs_input_grad[6:]) if need]
        need_pre = need_x or need_w1 or need_b1 or bool(act_live)
        _, fc1_g, in_g = w1.shape
        out_g = w2.shape[1]
        grad_x = torch.empty_like(x2d) if need_x else None
        grad_w1 = torch.empty_like(w1) if need_w1 else None
        grad_w2 = torch.empty_like(w2) if need_w2 else None
        grad_b1 = x2d.new_empty(groups, fc1_g) if need_b1 else None
        grad_b2 = grad_out.sum(0) if need_b2 else None
        grad_act = [torch.zeros_like(p) for p in act_live]
        # scratch buffers, reused group by group
        grad_hid = x2d.new_empty(x2d.shape[0], w2.shape[2]) if need_pre else None
        grad_pre_buf = x2d.new_empty(x2d.shape[0], fc1_g) if need_pre else None
        for i in range(groups):
            g_i = grad_out[:, i * out_g:(i + 1) * out_g]
            x_i = x2d[:, i * in_g:(i + 1) * in_g]
            if need_w2:
                torch.mm(g_i.t(), hids[i], out=grad_w2[i])
            if not need_pre:
                continue
            torch.mm(g_i, w2[i], out=grad_hid)
            mode = ctx.gelu_modes[i]
            if mode is not None and not act_live:
                grad_pre = torch.ops.aten.gelu_backward.grad_input(grad_hid, pres[i], approximate=mode,
                                                                    grad_input=grad_pre_buf)
            else:
                with torch.enable_grad():
                    pre = pres[i].detach().requires_grad_()
                    hid = hidden_fn(pre)
                if hid is pre:
                    grad_pre = grad_hid
                else:
                    grad_pre, *grads_act = torch.autograd.grad(hid, [pre, *act_live], grad_hid, allow_unused=True)
                    if grad_pre is None:
                        grad_pre = torch.zeros_like(pre)
                    for acc, g in zip(grad_act, grads_act):
                        if g is not None:
                            acc.add_(g)
            if need_w1:
                torch.mm(grad_pre.t(), x_i, out=grad_w1[i])
            if need_b1:
                torch.sum(grad_pre, 0, out=grad_b1[i])
            if need_x:
                torch.mm(grad_pre, w1[i], out=grad_x[:, i * in_g:(i + 1) * in_g])
        grad_act_iter = iter(grad_act)
        grads_act = tuple(next(grad_act_iter) if need else None for need in ctx.needs_input_grad[6:])
        return (grad_x, grad_w1, grad_b1.view(-1) if grad_b1 is not None else None, grad_w2, grad_b2, None,
                *grads_act)


def _mlp_tokens_unfused(x, w1, b1, w2, b2, hidden_fn: HiddenFn) -> torch.Tensor:
    """Autograd-native form: per group fc1 -> hidden -> fc2, then one cat (what torch.compile traces)."""
    groups, fc1_g, in_g = w1.shape
    out_g = w2.shape[1]
    b1_g = b1.view(groups, fc1_g).unbind(0) if b1 is not None else (None,) * groups
    b2_g = b2.view(groups, out_g).unbind(0) if b2 is not None else (None,) * groups
    outs = [F.linear(hidden_fn(F.linear(x[..., i * in_g:(i + 1) * in_g], w1[i], b1_g[i])), w2[i], b2_g[i])
            for i in range(groups)]
    return torch.cat(outs, dim=-1)


def _mlp_tokens_batched(x, w1, b1, w2, b2, hidden_fn: HiddenFn) -> torch.Tensor:
    """Two batched GEMMs over a strided (groups, tokens, width) view: one launch each on CUDA."""
    groups, fc1_g, in_g = w1.shape
    out_g = w2.shape[1]
    lead = x.shape[:-1]
    xg = x.reshape(-1, groups, in_g).transpose(0, 1)
    hid = torch.bmm(xg, w1.transpose(1, 2)) if b1 is None else \
        torch.baddbmm(b1.view(groups, 1, fc1_g), xg, w1.transpose(1, 2))
    hid = hidden_fn(hid)
    y = torch.bmm(hid, w2.transpose(1, 2)) if b2 is None else \
        torch.baddbmm(b2.view(groups, 1, out_g), hid, w2.transpose(1, 2))
    return y.transpose(0, 1).reshape(*lead, groups * out_g)


def block_diagonal_mlp(
        x: torch.Tensor,
        w1: torch.Tensor,
        b1: Optional[torch.Tensor],
        w2: torch.Tensor,
        b2: Optional[torch.Tensor],
        hidden_fn: HiddenFn,
        act_params: Sequence[torch.Tensor] = (),
        recompute: bool = False,
) -> torch.Tensor:
    """fc2(hidden_fn(fc1(x))) with block-diagonal fc1/fc2 on channels-last x (..., in_features).

    `hidden_fn` maps one group's fc1 output (..., fc1_out // groups) to its hidden units and must act on
    each token independently and deterministically (activation, gating); `act_params` are its parameters.
    `recompute=True` (CPU training) recomputes each hidden tile in backward instead of keeping the hidden
    activations: most of the activation memory saved for a few % more time.
    """
    groups = w1.shape[0]
    if x.device.type != 'cpu':
        return _mlp_tokens_batched(x, w1, b1, w2, b2, hidden_fn)
    if _compiling() or _autocast_dtype(x) is not None:
        return _mlp_tokens_unfused(x, w1, b1, w2, b2, hidden_fn)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if not _needs_grad(x, w1, b1, w2, b2, *act_params):
        y = _mlp_tokens_forward(x2d, w1, b1, w2, b2, hidden_fn)
    elif recompute:
        y = _TiledBlockDiagonalMlp.apply(x2d, w1, b1, w2, b2, hidden_fn, *act_params)
    else:
        y = _PerGroupBlockDiagonalMlp.apply(x2d, w1, b1, w2, b2, hidden_fn, *act_params)
    return y.reshape(*lead, groups * w2.shape[1])


# --- fused NCHW block-diagonal MLP ------------------------------------------------------------------------

def block_diagonal_mlp_nchw(
        x: torch.Tensor,
        w1: torch.Tensor,
        b1: Optional[torch.Tensor],
        w2: torch.Tensor,
        b2: Optional[torch.Tensor],
        hidden_fn: HiddenFn,
        act_params: Sequence[torch.Tensor] = (),
        recompute: bool = False,
) -> torch.Tensor:
    """fc2(hidden_fn(fc1(x))) with block-diagonal 1x1 convs on NCHW x (B, C, H, W).

    `hidden_fn` gets channels-last tiles (..., fc1_out // groups) when `nchw_on_tokens(x)` (CPU), else
    channels-first ones (B, fc1_out // groups, H, W).
    """
    if nchw_on_tokens(x):
        # CPU: two transposing copies and the token kernel beat any NCHW form. MetaFormer stages
        # (B=32, E=8, g=4), 1 thread: 1.7-2.6x the dense E=4 1x1-conv MLP, against 1.2-1.6x for a
        # per-sample/per-group NCHW tiling and 0.4-0.8x for two broadcast batched matmuls.
        y = block_diagonal_mlp(x.permute(0, 2, 3, 1), w1, b1, w2, b2, hidden_fn, act_params, recompute)
        return y.permute(0, 3, 1, 2).contiguous()
    hid = block_diagonal_conv1x1(x, w1, b1).chunk(w1.shape[0], dim=1)
    return block_diagonal_conv1x1(torch.cat([hidden_fn(h) for h in hid], dim=1), w2, b2)


def nchw_on_tokens(x: torch.Tensor) -> bool:
    """Whether `block_diagonal_mlp_nchw` runs on a channels-last copy of `x` (CPU) or on NCHW."""
    return x.device.type == 'cpu'


# --- modules ---------------------------------------------------------------------------------------------

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
        return block_diagonal_linear(x, self.weight, self.bias)


class BlockDiagonalConv1x1(_BlockDiagonal):
    """ Block-diagonal 1x1 convolution on NCHW input (B, in_features, H, W).
    """
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_diagonal_conv1x1(x, self.weight, self.bias)
