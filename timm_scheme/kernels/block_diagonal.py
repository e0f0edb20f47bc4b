"""Block-diagonal projections and the whole block-diagonal MLP as functions of their weights.

Weights are (groups, out_features // groups, in_features // groups): group i maps input channels
[i * in_g, (i + 1) * in_g) to output channels [i * out_g, (i + 1) * out_g). ``dispatch`` picks the form;
every form computes the same function (tests compare each against a dense matmul with a block mask).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import dispatch

HiddenFn = Callable[[torch.Tensor], torch.Tensor]

# Token tiles of the eager CPU MLP hold one group's hidden activations. The point is never allocating the whole
# (tokens, hidden) tensor, which at E=8 exceeds glibc's mmap threshold and page-faults on every call; the size
# follows the thread count (benchmarks/results/NOTES.md says what was measured).
TILE_BYTES_PER_THREAD = 16 << 20
MIN_TILE_TOKENS = 64


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


def _bmm_bias(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """(groups, rows, in_g) x weight (groups, out_g, in_g)^T + bias: one batched GEMM, the bias fused."""
    if bias is None:
        return torch.bmm(a, weight.transpose(1, 2))
    return torch.baddbmm(bias.view(weight.shape[0], 1, -1), a, weight.transpose(1, 2))


def _grouped_mm_bias(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
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
    return _linear_on_group_views(x, weight, bias, _bmm_bias)


def linear_grouped_mm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One ``torch._grouped_mm`` (grouped GEMM kernels on recent GPUs) over the (groups, tokens, in_g) view, then
    the bias. No autograd."""
    return _linear_on_group_views(x, weight, bias, _grouped_mm_bias)


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


# --- the whole block-diagonal MLP, channels-last ------------------------------------------------------------

def _tile_bytes() -> int:
    threads = torch.get_num_threads()
    return TILE_BYTES_PER_THREAD // 2 if threads <= 1 else TILE_BYTES_PER_THREAD * min(threads, 8)


def _tile_tokens(hidden_g: int, itemsize: int) -> int:
    tile = _tile_bytes() // max(1, hidden_g * itemsize)
    return max(MIN_TILE_TOKENS, tile // MIN_TILE_TOKENS * MIN_TILE_TOKENS)


def _mm_bias(x: torch.Tensor, w_t: torch.Tensor, bias: Optional[torch.Tensor], out=None) -> torch.Tensor:
    if bias is None:
        return torch.mm(x, w_t, out=out) if out is not None else torch.mm(x, w_t)
    return torch.addmm(bias, x, w_t, out=out) if out is not None else torch.addmm(bias, x, w_t)


def _shuffled_slots(hidden: torch.Tensor, groups: int) -> torch.Tensor:
    """(tokens, groups * hidden_g) shuffled-hidden buffer -> (tokens, groups_j, groups_i, chunk) view: fc1 group
    i's units go to [:, :, i, :], and fc2 group j reads the contiguous columns [:, j]."""
    return hidden.view(hidden.shape[0], groups, groups, -1)


def mlp_tiles_forward(x2d, w1, b1, w2, b2, hidden_fn: HiddenFn, shuffle: bool = False) -> torch.Tensor:
    """fc2(hidden_fn(fc1(x))) for (tokens, channels) input, tile by tile and group by group, no autograd;
    ``hidden_fn`` may overwrite the scratch tile it is given. With ``shuffle`` each group's hidden units are
    written to their shuffled places in a cache-resident tile of all groups, from which each fc2 group reads
    its columns: the shuffle costs a copy within the cache-resident tile, not a pass over a materialised hidden
    tensor."""
    groups, fc1_g, in_g = w1.shape
    out_g, hid_g = w2.shape[1], w2.shape[2]
    tokens = x2d.shape[0]
    out = x2d.new_empty(tokens, groups * out_g)
    tile = _tile_tokens(fc1_g + (groups * hid_g if shuffle else 0), x2d.element_size())
    w1_t, w2_t = w1.transpose(1, 2), w2.transpose(1, 2)
    b1_g = b1.view(groups, fc1_g) if b1 is not None else None
    buf = x2d.new_empty(min(tile, tokens), fc1_g)
    shuffled = x2d.new_empty(min(tile, tokens), groups * hid_g) if shuffle else None
    for start in range(0, tokens, tile):
        x_t = x2d[start:start + tile]
        rows = x_t.shape[0]
        pre = buf[:rows]
        out_t = out[start:start + tile]
        for i in range(groups):
            _mm_bias(x_t[:, i * in_g:(i + 1) * in_g], w1_t[i], b1_g[i] if b1_g is not None else None, out=pre)
            if shuffle:
                _shuffled_slots(shuffled[:rows], groups)[:, :, i].copy_(hidden_fn(pre).view(rows, groups, -1))
            else:
                torch.mm(hidden_fn(pre), w2_t[i], out=out_t[:, i * out_g:(i + 1) * out_g])
        if shuffle:
            for j in range(groups):
                torch.mm(shuffled[:rows, j * hid_g:(j + 1) * hid_g], w2_t[j], out=out_t[:, j * out_g:(j + 1) * out_g])
        if b2 is not None:  # once per tile, while it is in cache (cheaper than per strided group slice)
            out_t.add_(b2)
    return out


class TiledBlockDiagonalMlp(torch.autograd.Function):
    """Training form of the tiled kernel: saves only the input and recomputes each hidden tile in backward
    (cache-resident, one extra fc1 GEMM), so the (tokens, hidden) activations are never materialised."""

    @staticmethod
    def forward(ctx, x2d, w1, b1, w2, b2, hidden_fn, *act_params):
        ctx.hidden_fn = hidden_fn
        ctx.save_for_backward(x2d, w1, b1, w2, b2, *act_params)
        return mlp_tiles_forward(x2d, w1, b1, w2, b2, hidden_fn)

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


class PerGroupBlockDiagonalMlp(torch.autograd.Function):
    """Training form that keeps the hidden activations (CPU default): per group fc1 -> hidden_fn -> fc2 into
    the group's column slice of the output; backward writes each group's input gradient straight into its
    column slice and reuses one hidden-sized scratch buffer for all groups. Against the autograd-native
    per-group F.linear + cat it saves the cat, the slice backward (a zero-filled full-size input gradient per
    group, then their sum) and half the hidden-sized gradient allocations.

    Saves the input, each group's pre-activation and hidden units (what autograd would save, through the same
    saved-tensor hooks). With ``gelu`` set (hidden_fn is a bare GELU of that ``approximate`` mode, as in every
    timm ViT) backward calls aten's gelu_backward; any other hidden_fn is re-run on the saved pre-activation
    and differentiated by autograd."""

    @staticmethod
    def forward(ctx, x2d, w1, b1, w2, b2, hidden_fn, gelu, shuffle, *act_params):
        groups, fc1_g, in_g = w1.shape
        out_g, hid_g = w2.shape[1], w2.shape[2]
        tokens = x2d.shape[0]
        out = x2d.new_empty(tokens, groups * out_g)
        w1_t, w2_t = w1.transpose(1, 2), w2.transpose(1, 2)
        b1_g = b1.view(groups, fc1_g) if b1 is not None else None
        # with shuffle, each group's hidden units are written straight to their shuffled places
        shuffled = x2d.new_empty(tokens, groups * hid_g) if shuffle else None
        hids, pres = [], []
        for i in range(groups):
            pre = _mm_bias(x2d[:, i * in_g:(i + 1) * in_g], w1_t[i], b1_g[i] if b1_g is not None else None)
            with torch.enable_grad():  # keeps hidden_fn out of place: pre is saved
                hid = hidden_fn(pre.requires_grad_())
            pre = pre.detach()
            hid = hid.detach()
            if shuffle:
                _shuffled_slots(shuffled, groups)[:, :, i].copy_(hid.view(tokens, groups, -1))
            else:
                torch.mm(hid, w2_t[i], out=out[:, i * out_g:(i + 1) * out_g])
                hids.append(hid)
            pres.append(pre)
        if shuffle:  # fc2's inputs: column slices of the shuffled units
            hids = [shuffled[:, j * hid_g:(j + 1) * hid_g] for j in range(groups)]
            for j in range(groups):
                torch.mm(hids[j], w2_t[j], out=out[:, j * out_g:(j + 1) * out_g])
        if b2 is not None:
            out.add_(b2)
        ctx.hidden_fn, ctx.gelu, ctx.shuffle = hidden_fn, gelu, shuffle
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
        act_live = [p for p, need in zip(act_params, ctx.needs_input_grad[8:]) if need]
        need_pre = need_x or need_w1 or need_b1 or bool(act_live)
        _, fc1_g, in_g = w1.shape
        out_g, hid_g = w2.shape[1], w2.shape[2]
        grad_x = torch.empty_like(x2d) if need_x else None
        grad_w1 = torch.empty_like(w1) if need_w1 else None
        grad_w2 = torch.empty_like(w2) if need_w2 else None
        grad_b1 = x2d.new_empty(groups, fc1_g) if need_b1 else None
        grad_b2 = grad_out.sum(0) if need_b2 else None
        grad_act = [torch.zeros_like(p) for p in act_live]
        # scratch buffers, reused group by group
        grad_hid = x2d.new_empty(x2d.shape[0], hid_g) if need_pre else None
        grad_pre_buf = x2d.new_empty(x2d.shape[0], fc1_g) if need_pre else None
        chunk = hid_g // groups
        for i in range(groups):
            g_i = grad_out[:, i * out_g:(i + 1) * out_g]
            x_i = x2d[:, i * in_g:(i + 1) * in_g]
            if need_w2:
                torch.mm(g_i.t(), hids[i], out=grad_w2[i])
            if not need_pre:
                continue
            if ctx.shuffle:  # fc1 group i's chunk j was read by fc2 group j as its chunk i
                for j in range(groups):
                    torch.mm(grad_out[:, j * out_g:(j + 1) * out_g], w2[j][:, i * chunk:(i + 1) * chunk],
                             out=grad_hid[:, j * chunk:(j + 1) * chunk])
            else:
                torch.mm(g_i, w2[i], out=grad_hid)
            if ctx.gelu is not None and not act_live:
                grad_pre = torch.ops.aten.gelu_backward.grad_input(grad_hid, pres[i], approximate=ctx.gelu,
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
        grads_act = tuple(next(grad_act_iter) if need else None for need in ctx.needs_input_grad[8:])
        return (grad_x, grad_w1, grad_b1.view(-1) if grad_b1 is not None else None, grad_w2, grad_b2, None, None,
                None, *grads_act)


def mlp_per_group(x, w1, b1, w2, b2, hidden_fn: HiddenFn, shuffle: bool = False) -> torch.Tensor:
    """Autograd-native form: per group fc1 -> hidden -> fc2, then one cat (what torch.compile traces)."""
    groups, fc1_g, in_g = w1.shape
    out_g = w2.shape[1]
    if shuffle:
        hidden = torch.cat([hidden_fn(F.linear(x[..., i * in_g:(i + 1) * in_g], w1[i],
                                               b1[i * fc1_g:(i + 1) * fc1_g] if b1 is not None else None))
                            for i in range(groups)], dim=-1)
        return linear_per_group(shuffle_channels(hidden, groups), w2, b2, groups, w2.shape[2], out_g)
    outs = []
    for i in range(groups):
        bias1 = b1[i * fc1_g:(i + 1) * fc1_g] if b1 is not None else None
        bias2 = b2[i * out_g:(i + 1) * out_g] if b2 is not None else None
        outs.append(F.linear(hidden_fn(F.linear(x[..., i * in_g:(i + 1) * in_g], w1[i], bias1)), w2[i], bias2))
    return torch.cat(outs, dim=-1)


def _mlp_on_group_views(x, w1, b1, w2, b2, hidden_fn: HiddenFn, shuffle: bool, product: GroupProduct):
    groups, out_g = w1.shape[0], w2.shape[1]
    lead = x.shape[:-1]
    hid = hidden_fn(product(x.reshape(-1, groups, w1.shape[2]).transpose(0, 1), w1, b1))
    if shuffle:  # (g_i, tokens, g_j, chunk) -> (g_j, tokens, g_i * chunk)
        hid = hid.unflatten(2, (groups, -1)).permute(2, 1, 0, 3).reshape(groups, hid.shape[1], -1)
    y = product(hid, w2, b2)
    return y.transpose(0, 1).reshape(*lead, groups * out_g)


def mlp_batched(x, w1, b1, w2, b2, hidden_fn: HiddenFn, shuffle: bool = False) -> torch.Tensor:
    """Two batched GEMMs over a strided (groups, tokens, width) view: one launch each on CUDA. With ``shuffle``
    the hidden units are regrouped between them (one copy of the hidden tensor)."""
    return _mlp_on_group_views(x, w1, b1, w2, b2, hidden_fn, shuffle, _bmm_bias)


def mlp_grouped_mm(x, w1, b1, w2, b2, hidden_fn: HiddenFn, shuffle: bool = False) -> torch.Tensor:
    """Two ``torch._grouped_mm`` over the (groups, tokens, width) view, the hidden function (and the shuffle)
    between them, as in ``mlp_batched``. No autograd."""
    return _mlp_on_group_views(x, w1, b1, w2, b2, hidden_fn, shuffle, _grouped_mm_bias)


def block_diagonal_mlp(
        x: torch.Tensor,
        w1: torch.Tensor,
        b1: Optional[torch.Tensor],
        w2: torch.Tensor,
        b2: Optional[torch.Tensor],
        hidden_fn: HiddenFn,
        act_params: Sequence[torch.Tensor] = (),
        recompute: bool = False,
        gelu: Optional[str] = None,
        shuffle: bool = False,
) -> torch.Tensor:
    """fc2(hidden_fn(fc1(x))) with block-diagonal fc1/fc2 on channels-last x (..., in_features).

    ``hidden_fn`` maps one group's fc1 output (..., fc1_out // groups) to its hidden units and must act on
    each token independently and deterministically (activation, gating); ``act_params`` are its parameters.
    ``gelu``: hidden_fn is a bare ``nn.GELU`` of this ``approximate`` mode (a faster backward on CPU).
    ``recompute=True`` (CPU training) recomputes each hidden tile in backward instead of keeping the hidden
    activations: most of the activation memory saved for a few % more time (not with ``shuffle``, whose fc2
    groups each need every group's hidden tile).
    ``shuffle``: fc2 reads the hidden units through ``shuffle_channels``.
    """
    groups = w1.shape[0]
    kernel = dispatch.mlp_kernel(x, w1, b1, w2, b2, *act_params, recompute=recompute and not shuffle)
    if kernel == dispatch.BATCHED:
        return mlp_batched(x, w1, b1, w2, b2, hidden_fn, shuffle)
    if kernel == dispatch.GROUPED_MM:
        return mlp_grouped_mm(x, w1, b1, w2, b2, hidden_fn, shuffle)
    if kernel in (dispatch.PER_GROUP, dispatch.PLAIN):
        return mlp_per_group(x, w1, b1, w2, b2, hidden_fn, shuffle)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if kernel == dispatch.SLICES:
        y = mlp_tiles_forward(x2d, w1, b1, w2, b2, hidden_fn, shuffle)
    elif kernel == dispatch.RECOMPUTE_FN:
        y = TiledBlockDiagonalMlp.apply(x2d, w1, b1, w2, b2, hidden_fn, *act_params)
    else:
        y = PerGroupBlockDiagonalMlp.apply(x2d, w1, b1, w2, b2, hidden_fn, gelu, shuffle, *act_params)
    return y.reshape(*lead, groups * w2.shape[1])


def block_diagonal_mlp_nchw(
        x: torch.Tensor,
        w1: torch.Tensor,
        b1: Optional[torch.Tensor],
        w2: torch.Tensor,
        b2: Optional[torch.Tensor],
        hidden_fn: HiddenFn,
        act_params: Sequence[torch.Tensor] = (),
        recompute: bool = False,
        gelu: Optional[str] = None,
        shuffle: bool = False,
) -> torch.Tensor:
    """fc2(hidden_fn(fc1(x))) with block-diagonal 1x1 convs on NCHW x (B, C, H, W).

    ``hidden_fn`` gets channels-last tiles (..., fc1_out // groups) when ``dispatch.nchw_on_tokens(x)``
    (eager CPU), else channels-first ones (B, fc1_out // groups, H, W).
    """
    if dispatch.nchw_on_tokens(x):
        y = block_diagonal_mlp(x.permute(0, 2, 3, 1), w1, b1, w2, b2, hidden_fn, act_params, recompute, gelu,
                               shuffle)
        return y.permute(0, 3, 1, 2).contiguous()
    groups = w1.shape[0]
    hid = torch.cat([hidden_fn(h) for h in block_diagonal_conv1x1(x, w1, b1).chunk(groups, dim=1)], dim=1)
    return block_diagonal_conv1x1(shuffle_channels(hid, groups, dim=1) if shuffle else hid, w2, b2)
