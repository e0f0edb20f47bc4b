"""The whole block-diagonal MLP, fc2(hidden_fn(fc1(x))), as functions of its weights: the eager CPU kernels that
run token tile by token tile and group by group (forward, and autograd Functions that recompute or keep the hidden
activations), the batched and per-group forms, and ``block_diagonal_mlp`` / ``block_diagonal_mlp_nchw``, which
``dispatch`` points at one of them. Weights as in ``block_diagonal``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import dispatch
from .block_diagonal import (GroupProduct, block_diagonal_conv1x1, bmm_bias, grouped_mm_bias, linear_per_group,
                             shuffle_channels)

HiddenFn = Callable[[torch.Tensor], torch.Tensor]

# Token tiles of the eager CPU MLP hold one group's hidden activations. The point is never allocating the whole
# (tokens, hidden) tensor, which at E=8 exceeds glibc's mmap threshold and page-faults on every call; the size
# follows the thread count (benchmarks/results/NOTES.md says what was measured).
TILE_BYTES_PER_THREAD = 16 << 20
MIN_TILE_TOKENS = 64


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
    return _mlp_on_group_views(x, w1, b1, w2, b2, hidden_fn, shuffle, bmm_bias)


def mlp_grouped_mm(x, w1, b1, w2, b2, hidden_fn: HiddenFn, shuffle: bool = False) -> torch.Tensor:
    """Two ``torch._grouped_mm`` over the (groups, tokens, width) view, the hidden function (and the shuffle)
    between them, as in ``mlp_batched``. No autograd."""
    return _mlp_on_group_views(x, w1, b1, w2, b2, hidden_fn, shuffle, grouped_mm_bias)


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
