"""The benchmark cases: kernels, the BD-MLP block, CCA, whole models (inference and a training step),
torch.compile / bf16, and how the ratios scale with image size and batch."""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import math
import multiprocessing as mp
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import timm
import timm_scheme
import timm_scheme.kernels.block_diagonal as bd
from timm_scheme.layers import ChannelCovarianceAttention, SchemeMlp

from .harness import Settings, Table, compare, ms, ratio

C_TINY, TOKENS_TINY = 192, 197  # DeiT-Tiny width and tokens at 224 px


@dataclass
class Plan:
    """Sizes of one run (quick or full)."""
    batch: int
    model_names: Tuple[str, ...]
    train_batch: int
    scaling: bool
    compile: bool
    memory: bool
    adapted_models: Tuple[str, ...] = ("levit_128s", "efficientvit_m0", "tiny_vit_5m_224")


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn()
    return run


def _fwd_bwd(module: Callable, x: torch.Tensor, params) -> Callable[[], object]:
    x = x.detach().requires_grad_()

    def run():
        y = module(x)
        torch.autograd.grad(y.float().square().mean(), [x, *params])
    return run


def _grouped_mm_available(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        torch._grouped_mm(x[:2].reshape(2, 1, -1), w[:2].transpose(1, 2))
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


# --- 1. block-diagonal linear against dense GEMMs of equal FLOPs -------------------------------------------

def kernel_table(plan: Plan, settings: Settings) -> Table:
    tokens = plan.batch * TOKENS_TINY
    groups = 4
    table = Table(
        f"Block-diagonal linear vs dense GEMM of equal FLOPs (inference, g={groups}, {tokens} tokens = "
        f"batch {plan.batch} x {TOKENS_TINY}, fp32)",
        ["layer", "kernel", "ms", "throughput vs dense, same output shape", "vs dense, same input shape"])
    for in_f, out_f, label in ((C_TINY, 8 * C_TINY, "fc1 192->1536"), (8 * C_TINY, C_TINY, "fc2 1536->192")):
        torch.manual_seed(0)
        in_g, out_g = in_f // groups, out_f // groups
        x = torch.randn(tokens, in_f)
        w = torch.randn(groups, out_g, in_g) * in_g ** -0.5
        b = torch.randn(out_f)
        # equal FLOPs, two ways: same output (K = in/g) or same input (N = out/g)
        x_small = torch.randn(tokens, in_g)
        dense_same_out = nn.Linear(in_g, out_f)
        dense_same_in = nn.Linear(in_f, out_g)
        conv = nn.Conv2d(in_f, out_f, 1, groups=groups)
        x_nchw = x.t().reshape(1, in_f, tokens, 1).contiguous()
        fns = {
            "dense, same output": lambda: dense_same_out(x_small),
            "dense, same input": lambda: dense_same_in(x),
            "ours (GEMM per group into output slices)": lambda: bd.block_diagonal_linear(x, w, b),
            "F.linear per group + cat": lambda: bd.linear_per_group(x, w, b, groups, in_g, out_g),
            "batched bmm on (g, tokens, c) view": lambda: bd.linear_batched(x, w, b),
            "grouped 1x1 Conv2d (NCHW)": lambda: conv(x_nchw),
        }
        if _grouped_mm_available(x, w):
            wt = w.transpose(1, 2)
            fns["torch._grouped_mm"] = lambda: (torch._grouped_mm(x.view(tokens, groups, in_g).transpose(0, 1), wt)
                                                + b.view(groups, 1, out_g)).transpose(0, 1).reshape(tokens, out_f)
        t = compare({k: _no_grad(f) for k, f in fns.items()}, settings)
        for name in fns:
            if name.startswith("dense"):
                continue
            table.add(label, name, ms(t[name]), ratio(t, "dense, same output", name),
                      ratio(t, "dense, same input", name))
        table.add(label, "dense, same output (reference)", ms(t["dense, same output"]), 1.0,
                  ratio(t, "dense, same input", "dense, same output"))
    table.notes.append("throughput ratio = median over interleaved rounds of t(dense) / t(kernel); target >= 0.9")
    return table


# --- 2. the BD-MLP block --------------------------------------------------------------------------------

def _block_modules(c: int, groups: int = 4):
    torch.manual_seed(0)
    dense4 = timm.layers.Mlp(c, 4 * c)
    dense8 = timm.layers.Mlp(c, 8 * c)
    scheme = SchemeMlp(c, 8 * c, groups=groups, cca=False)
    conv = nn.Sequential(nn.Conv2d(c, 8 * c, 1, groups=groups), nn.GELU(), nn.Conv2d(8 * c, c, 1, groups=groups))
    return dense4, dense8, scheme, conv


def _scheme_variant(scheme: SchemeMlp, kernel: str) -> Callable[[torch.Tensor], torch.Tensor]:
    fc1, fc2 = scheme.fc1, scheme.fc2
    if kernel == "unfused":
        return lambda x: bd.mlp_per_group(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, F.gelu)
    if kernel == "unfused_inplace":  # the same, GELU in place on each fc1 output (what eval would run untiled)
        return lambda x: bd.mlp_per_group(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, scheme.group_hidden)
    if kernel == "tiled":  # the tiled no-autograd kernel, called directly (whatever block_diagonal_mlp picks)
        return lambda x: bd.mlp_tiles_forward(x.reshape(-1, x.shape[-1]), fc1.weight, fc1.bias, fc2.weight,
                                                fc2.bias, scheme.group_hidden).view(*x.shape[:-1], -1)
    if kernel == "batched":
        return lambda x: bd.mlp_batched(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, F.gelu)
    if kernel == "layered":
        return lambda x: fc2(F.gelu(fc1(x)))
    if kernel == "recompute":
        return lambda x: bd.block_diagonal_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, F.gelu,
                                               recompute=True)
    return scheme


def block_tables(plan: Plan, settings: Settings) -> List[Table]:
    b, n, c = plan.batch, TOKENS_TINY, C_TINY
    dense4, dense8, scheme, conv = _block_modules(c)
    x = torch.randn(b, n, c)
    x_nchw = x.transpose(1, 2).reshape(b, c, n, 1).contiguous()  # the conv form gets its own layout for free
    infer = Table(f"BD-MLP block (g=4, E=8) vs dense MLP, inference, DeiT-Tiny sizes (batch {b} x {n} tokens, "
                  "C=192, fp32)", ["kernel", "ms", "speedup vs dense E=4", "speedup vs grouped Conv2d"])
    fns = {
        "dense E=4 (timm Mlp)": lambda: dense4(x),
        "dense E=8 (timm Mlp)": lambda: dense8(x),
        "grouped 1x1 Conv2d, E=8 (authors' kernel)": lambda: conv(x_nchw),
        "ours (SchemeMlp, eval)": lambda: scheme.eval()(x),
        "token-tiled GEMM per group, GELU in place, GEMM into output slice":
            lambda: _scheme_variant(scheme, "tiled")(x),
        "per-group F.linear->GELU->F.linear + cat": lambda: _scheme_variant(scheme, "unfused")(x),
        "per-group F.linear->GELU in place->F.linear + cat": lambda: _scheme_variant(scheme, "unfused_inplace")(x),
        "2 batched bmm": lambda: _scheme_variant(scheme, "batched")(x),
        "layered: BlockDiagonalLinear, GELU, BlockDiagonalLinear": lambda: _scheme_variant(scheme, "layered")(x),
    }
    t = compare({k: _no_grad(f) for k, f in fns.items()}, settings)
    ref, conv_name = "dense E=4 (timm Mlp)", "grouped 1x1 Conv2d, E=8 (authors' kernel)"
    for name in fns:
        infer.add(name, ms(t[name]), ratio(t, ref, name), ratio(t, conv_name, name))
    infer.notes.append("targets: ours >= 1.6x dense E=4 and >= 3x the grouped Conv2d")
    infer.notes.append(f"'ours' is what SchemeMlp.eval() runs at {torch.get_num_threads()} thread(s); the tiled and "
                       "the per-group + cat kernels are also timed directly (block_diagonal.py runs the tiled one, "
                       "its tile size picked by thread count)")
    attainable = attainable_table(plan, settings, dense4, scheme, x)

    train = Table(f"BD-MLP block and CCA, training (forward + backward), batch {b} x {n} tokens, fp32",
                  ["kernel", "ms", "time / dense E=4"])
    scheme.train()
    with_cca = SchemeMlp(c, 8 * c, groups=4, cca=True).train()
    cca = ChannelCovarianceAttention(with_cca.cca.scale)
    p_dense, p_scheme, p_cca = list(dense4.parameters()), list(scheme.parameters()), list(with_cca.parameters())
    fns = {
        "dense E=4 (timm Mlp)": _fwd_bwd(dense4, x, p_dense),
        "grouped 1x1 Conv2d, E=8": _fwd_bwd(conv, x_nchw, list(conv.parameters())),
        "ours (SchemeMlp default: per-group autograd.Function, slice-wise backward)":
            _fwd_bwd(scheme, x, p_scheme),
        "ours, recompute_hidden=True (tiled, hidden recomputed in backward)":
            _fwd_bwd(_scheme_variant(scheme, "recompute"), x, p_scheme),
        "per-group F.linear->GELU->F.linear + cat": _fwd_bwd(_scheme_variant(scheme, "unfused"), x, p_scheme),
        "2 batched bmm": _fwd_bwd(_scheme_variant(scheme, "batched"), x, p_scheme),
        "CCA alone (ours, 3-GEMM backward)": _fwd_bwd(cca, x, []),
        "CCA alone, plain autograd": _fwd_bwd(lambda t: _naive_cca(t, cca.scale), x, []),
        "ours: BD-MLP + CCA (SchemeMlp, training)": _fwd_bwd(with_cca, x, p_cca),
    }
    t = compare(fns, settings)
    for name in fns:
        train.add(name, ms(t[name]), 1.0 / ratio(t, "dense E=4 (timm Mlp)", name))
    mixed, alone, cca_alone = ("ours: BD-MLP + CCA (SchemeMlp, training)",
                               "ours (SchemeMlp default: per-group autograd.Function, slice-wise backward)",
                               "CCA alone (ours, 3-GEMM backward)")
    # per round (the three were timed back to back), then the median: what joining the branches costs
    # (lerp forward and backward, the mixing weights' softmax and gradient, summing the two input gradients)
    overhead = statistics.median(m - a - k for m, a, k in zip(t[mixed].samples, t[alone].samples,
                                                                t[cca_alone].samples))
    dense_ms = t["dense E=4 (timm Mlp)"].median
    train.notes.append(f"mixing overhead (BD-MLP + CCA minus BD-MLP alone minus CCA alone, median over rounds): "
                       f"{overhead * 1e3:.2f} ms = {overhead / dense_ms:.3f} of the dense E=4 time")
    train_attainable = attainable_train_table(plan, settings, dense4, scheme, x)
    return [infer, attainable, train, train_attainable]


def shuffle_table(plan: Plan, settings: Settings) -> Table:
    """What the channel shuffle costs: the BD-MLP with and without it, inference and training, and the shuffle
    done as an explicit copy of the whole hidden tensor between two block-diagonal layers."""
    b, n, c = plan.batch, TOKENS_TINY, C_TINY
    torch.manual_seed(0)
    plain = SchemeMlp(c, 8 * c, groups=4, cca=False)
    shuffled = SchemeMlp(c, 8 * c, groups=4, cca=False, channel_shuffle=True)
    shuffled.load_state_dict(plain.state_dict())
    fc1, fc2 = shuffled.fc1, shuffled.fc2

    def copied(x):  # the hidden tensor materialised, shuffled by a copy, then fc2
        return fc2(bd.shuffle_channels(F.gelu(fc1(x)), 4))

    x = torch.randn(b, n, c)
    table = Table(f"Channel shuffle cost: BD-MLP (g=4, E=8), batch {b} x {n} tokens, C=192, fp32",
                  ["pass", "kernel", "ms", "time / unshuffled"])
    plain_params, shuffled_params = list(plain.parameters()), list(shuffled.parameters())
    for label, fns in (
            ("inference", {"unshuffled (SchemeMlp, eval)": _no_grad(lambda: plain.eval()(x)),
                           "shuffled (SchemeMlp, eval)": _no_grad(lambda: shuffled.eval()(x)),
                           "shuffled by copying the hidden tensor": _no_grad(lambda: copied(x))}),
            ("training", {"unshuffled (SchemeMlp, eval)": _fwd_bwd(plain.train(), x, plain_params),
                          "shuffled (SchemeMlp, eval)": _fwd_bwd(shuffled.train(), x, shuffled_params),
                          "shuffled by copying the hidden tensor": _fwd_bwd(copied, x, shuffled_params)})):
        t = compare(fns, settings)
        for name in fns:
            shown = name.replace("eval", "training") if label == "training" else name
            table.add(label, shown, ms(t[name]), 1.0 / ratio(t, "unshuffled (SchemeMlp, eval)", name))
    table.notes.append("the shuffled kernels write each group's hidden units to their shuffled places in the "
                       "token tile (inference) or in the saved hidden tensor (training); no separate pass")
    return table


def attainable_train_table(plan: Plan, settings: Settings, dense4: nn.Module, scheme: SchemeMlp,
                           x: torch.Tensor) -> Table:
    """The training counterpart of `attainable_table`: forward + backward of the dense E=4 MLP done with bare
    ops (addmm, GELU, addmm; then fc2's grad-weight and grad-input GEMMs, GELU's backward, fc1's grad-weight and
    grad-input GEMMs, the bias sums), all into preallocated buffers, against g x the same ops on one group's
    shapes (contiguous per-group inputs and output gradients, each group's pre-activation and hidden kept, as
    autograd keeps them): what per-group GEMMs can attain in training on this BLAS. Each op is also timed
    alone. The autograd rows get the same fixed output gradient (no loss), so all rows do the same work."""
    b, n, c = x.shape
    tokens, groups = b * n, scheme.fc1.weight.shape[0]
    torch.manual_seed(1)
    x2d = x.reshape(tokens, c).contiguous()
    gy = torch.randn(tokens, c) * (tokens * c) ** -0.5
    gelu_out, gelu_bwd = torch.ops.aten.gelu.out, torch.ops.aten.gelu_backward.grad_input
    # dense E=4
    w1d, b1d = dense4.fc1.weight.detach(), dense4.fc1.bias.detach()   # (H, C)
    w2d, b2d = dense4.fc2.weight.detach(), dense4.fc2.bias.detach()   # (C, H)
    hd = w1d.shape[0]
    pre_d, act_d, out_d = x2d.new_empty(tokens, hd), x2d.new_empty(tokens, hd), x2d.new_empty(tokens, c)
    gw1_d, gb1_d, gw2_d, gb2_d = torch.empty_like(w1d), torch.empty_like(b1d), torch.empty_like(w2d), \
        torch.empty_like(b2d)
    gh_d, gpre_d, gx_d = torch.empty_like(pre_d), torch.empty_like(pre_d), torch.empty_like(x2d)
    # g x one group: weights (groups, out_g, in_g)
    w1, b1 = scheme.fc1.weight.detach(), scheme.fc1.bias.detach()
    w2, b2 = scheme.fc2.weight.detach(), scheme.fc2.bias.detach()
    hg, og, ig = w1.shape[1], w2.shape[1], w1.shape[2]
    b1s, b2s = b1.view(groups, hg), b2.view(groups, og)
    xs = [x2d[:, i * ig:(i + 1) * ig].contiguous() for i in range(groups)]
    gys = [gy[:, i * og:(i + 1) * og].contiguous() for i in range(groups)]
    pre_g = [x2d.new_empty(tokens, hg) for _ in range(groups)]
    act_g = [x2d.new_empty(tokens, hg) for _ in range(groups)]
    out_g = [x2d.new_empty(tokens, og) for _ in range(groups)]
    gx_g = [x2d.new_empty(tokens, ig) for _ in range(groups)]
    gw1_g, gw2_g = torch.empty_like(w1), torch.empty_like(w2)
    gb1_g, gb2_g = x2d.new_empty(groups, hg), x2d.new_empty(groups, og)
    gh_g, gpre_g = x2d.new_empty(tokens, hg), x2d.new_empty(tokens, hg)  # scratch, reused group by group

    def d_fc1():
        torch.addmm(b1d, x2d, w1d.t(), out=pre_d)

    def d_gelu():
        gelu_out(pre_d, out=act_d)

    def d_fc2():
        torch.addmm(b2d, act_d, w2d.t(), out=out_d)

    def d_fc2_gw():
        torch.mm(gy.t(), act_d, out=gw2_d)

    def d_fc2_gx():
        torch.mm(gy, w2d, out=gh_d)

    def d_gelu_bwd():
        gelu_bwd(gh_d, pre_d, grad_input=gpre_d)

    def d_fc1_gw():
        torch.mm(gpre_d.t(), x2d, out=gw1_d)

    def d_fc1_gx():
        torch.mm(gpre_d, w1d, out=gx_d)

    def d_bias():
        torch.sum(gy, 0, out=gb2_d), torch.sum(gpre_d, 0, out=gb1_d)

    def d_fwd():
        d_fc1(), d_gelu(), d_fc2()

    def d_bwd():
        d_fc2_gw(), d_fc2_gx(), d_gelu_bwd(), d_fc1_gw(), d_fc1_gx(), d_bias()

    def g_fc1(i):
        torch.addmm(b1s[i], xs[i], w1[i].t(), out=pre_g[i])

    def g_gelu(i):
        gelu_out(pre_g[i], out=act_g[i])

    def g_fc2(i):
        torch.addmm(b2s[i], act_g[i], w2[i].t(), out=out_g[i])

    def g_fc2_gw(i):
        torch.mm(gys[i].t(), act_g[i], out=gw2_g[i])

    def g_fc2_gx(i):
        torch.mm(gys[i], w2[i], out=gh_g)

    def g_gelu_bwd(i):
        gelu_bwd(gh_g, pre_g[i], grad_input=gpre_g)

    def g_fc1_gw(i):
        torch.mm(gpre_g.t(), xs[i], out=gw1_g[i])

    def g_fc1_gx(i):
        torch.mm(gpre_g, w1[i], out=gx_g[i])

    def g_bias(i):
        torch.sum(gys[i], 0, out=gb2_g[i]), torch.sum(gpre_g, 0, out=gb1_g[i])

    def all_groups(*ops):
        def run():
            for i in range(groups):
                for op in ops:
                    op(i)
        return run

    g_fwd = all_groups(g_fc1, g_gelu, g_fc2)
    g_bwd = all_groups(g_fc2_gw, g_fc2_gx, g_gelu_bwd, g_fc1_gw, g_fc1_gx, g_bias)

    def with_grad(module, params):
        xr = x.detach().requires_grad_()
        gy3 = gy.view(b, n, c)

        def run():
            torch.autograd.grad(module(xr), [xr, *params], gy3)
        return run

    with torch.no_grad():  # the backward parts read what the forward leaves in the buffers
        d_fwd(), g_fwd(), d_bwd(), g_bwd()
    scheme.train()
    g = f"{groups} x group"
    dense_total, group_total = "dense E=4: bare ops, forward + backward", f"{g}: bare ops, forward + backward"
    fns = {
        "dense E=4: timm Mlp, autograd": with_grad(dense4, list(dense4.parameters())),
        dense_total: lambda: (d_fwd(), d_bwd()),
        group_total: lambda: (g_fwd(), g_bwd()),
        "ours (SchemeMlp BD-MLP, training, autograd)": with_grad(scheme, list(scheme.parameters())),
        "per-group F.linear->GELU->F.linear + cat, autograd": with_grad(
            _scheme_variant(scheme, "unfused"), list(scheme.parameters())),
        "dense E=4: bare forward": d_fwd,
        "dense E=4: bare backward": d_bwd,
        f"{g}: bare forward": g_fwd,
        f"{g}: bare backward": g_bwd,
    }
    parts = (("fc1 addmm", d_fc1, g_fc1), ("GELU", d_gelu, g_gelu), ("fc2 addmm", d_fc2, g_fc2),
             ("fc2 grad-weight mm", d_fc2_gw, g_fc2_gw), ("fc2 grad-input mm", d_fc2_gx, g_fc2_gx),
             ("GELU backward", d_gelu_bwd, g_gelu_bwd), ("fc1 grad-weight mm", d_fc1_gw, g_fc1_gw),
             ("fc1 grad-input mm", d_fc1_gx, g_fc1_gx), ("bias grads (2 sums)", d_bias, g_bias))
    for label, dense_op, group_op in parts:
        fns[f"parts: dense {label}"] = dense_op
        fns[f"parts: {g} {label}"] = all_groups(group_op)
    t = compare({k: _no_grad(f) if k.startswith(("dense E=4: bare", f"{g}: bare", "parts")) else f
                 for k, f in fns.items()}, settings)
    ref = "dense E=4: timm Mlp, autograd"
    table = Table(f"Attainable in training: the BLAS on the BD-MLP's shapes, forward + backward (batch {b} x {n} "
                  f"tokens, C={c}, g={groups}, E=8 vs dense E=4)",
                  ["what", "ms", "time / timm dense E=4", "time / dense bare ops", "share of its total",
                   "group / dense"])
    for name in fns:
        if "group" in name:
            total = group_total
        elif name.startswith(("parts: dense", "dense E=4: bare")):
            total = dense_total
        else:
            total = None
        share = t[name].median / t[total].median if total else math.nan
        pair = math.nan
        if name.startswith(f"parts: {g} "):
            pair = 1.0 / ratio(t, "parts: dense " + name[len(f"parts: {g} "):], name)
        elif name.startswith(f"{g}: bare"):
            pair = 1.0 / ratio(t, "dense E=4: bare" + name[len(f"{g}: bare"):], name)
        table.add(name, ms(t[name]), 1.0 / ratio(t, ref, name), 1.0 / ratio(t, dense_total, name), share, pair)
    ours = "ours (SchemeMlp BD-MLP, training, autograd)"
    table.notes.append(f"attainable training time on this BLAS (g x group bare ops / dense bare ops): "
                       f"{1.0 / ratio(t, dense_total, group_total):.3f} (the MAC count allows 0.5); vs timm's dense "
                       f"Mlp: {1.0 / ratio(t, ref, group_total):.3f}; ours {1.0 / ratio(t, ref, ours):.3f} of timm's "
                       f"time and reaches {ratio(t, group_total, ours):.2f} of the attainable throughput "
                       "(t(bare per-group) / t(ours)); the autograd-native per-group + cat reaches "
                       f"{ratio(t, group_total, 'per-group F.linear->GELU->F.linear + cat, autograd'):.2f}")
    table.notes.append("the bare rows skip what a real kernel pays: strided group slices of the input and of the "
                       "output gradient, allocating every saved and gradient tensor, autograd's bookkeeping, "
                       "accumulating the parameter gradients; 'parts' time each op alone (shares = median part / "
                       "median total, do not sum exactly to 1); 'group / dense' = g x the group op's time over "
                       "the dense op's")
    return table


def attainable_table(plan: Plan, settings: Settings, dense4: nn.Module, scheme: SchemeMlp, x: torch.Tensor) -> Table:
    """What the BLAS gives for these shapes: the dense E=4 MLP's two GEMMs + GELU against g independent
    (GEMM, GELU, GEMM) of one group's shapes, all on contiguous inputs into preallocated outputs (no
    allocation, no strided views, no cat): the speedup a block-diagonal kernel could reach on this BLAS."""
    b, n, c = x.shape
    tokens, groups = b * n, scheme.fc1.weight.shape[0]
    x2d = x.reshape(tokens, c)
    w1d, b1d = dense4.fc1.weight.detach().t(), dense4.fc1.bias.detach()  # transposed views, as F.linear reads them
    w2d, b2d = dense4.fc2.weight.detach().t(), dense4.fc2.bias.detach()
    hid_d, out_d = x2d.new_empty(tokens, w1d.shape[1]), x2d.new_empty(tokens, c)
    w1, b1 = scheme.fc1.weight.detach(), scheme.fc1.bias.detach()
    w2, b2 = scheme.fc2.weight.detach(), scheme.fc2.bias.detach()
    hg, og, ig = w1.shape[1], w2.shape[1], w1.shape[2]
    xs = [x2d[:, i * ig:(i + 1) * ig].contiguous() for i in range(groups)]
    w1t, w2t = [w.t() for w in w1], [w.t() for w in w2]
    b1s, b2s = b1.view(groups, hg), b2.view(groups, og)
    hid_g, out_g = x2d.new_empty(tokens, hg), [x2d.new_empty(tokens, og) for _ in range(groups)]
    gelu_ = torch.ops.aten.gelu_
    gelu_out = torch.ops.aten.gelu.out
    # the 'parts' rows apply GELU to saved pre-activations, out of place: GELU applied to its own output again
    # and again drifts into denormals, which would time the FPU's slow path instead of the kernel
    with torch.no_grad():
        pre_d = torch.addmm(b1d, x2d, w1d)
        pre_g = [torch.addmm(b1s[i], xs[i], w1t[i]) for i in range(groups)]
    act_d, act_g = torch.empty_like(pre_d), torch.empty_like(pre_g[0])

    def dense_fc1():
        torch.addmm(b1d, x2d, w1d, out=hid_d)

    def dense_fc2():
        torch.addmm(b2d, hid_d, w2d, out=out_d)

    def group_fc1():
        for i in range(groups):
            torch.addmm(b1s[i], xs[i], w1t[i], out=hid_g)

    def group_fc2():
        for i in range(groups):
            torch.addmm(b2s[i], hid_g, w2t[i], out=out_g[i])

    def group_gelu():
        for i in range(groups):
            gelu_out(pre_g[i], out=act_g)

    def dense_all():
        dense_fc1(), gelu_(hid_d), dense_fc2()

    def group_all():
        for i in range(groups):
            torch.addmm(b1s[i], xs[i], w1t[i], out=hid_g)
            gelu_(hid_g)
            torch.addmm(b2s[i], hid_g, w2t[i], out=out_g[i])

    fns = {
        "dense E=4: timm Mlp": lambda: dense4(x),
        "dense E=4: addmm + GELU in place + addmm, preallocated": dense_all,
        f"{groups} x one group's (addmm + GELU in place + addmm), contiguous, preallocated": group_all,
        "ours (SchemeMlp, eval)": lambda: scheme.eval()(x),
        "parts: dense fc1 addmm": dense_fc1,
        "parts: dense GELU (out of place)": lambda: gelu_out(pre_d, out=act_d),
        "parts: dense fc2 addmm": dense_fc2,
        f"parts: {groups} x group fc1 addmm": group_fc1,
        f"parts: {groups} x group GELU (out of place)": group_gelu,
        f"parts: {groups} x group fc2 addmm": group_fc2,
    }
    t = compare({k: _no_grad(f) for k, f in fns.items()}, settings)
    ref = "dense E=4: timm Mlp"
    blas_dense = "dense E=4: addmm + GELU in place + addmm, preallocated"
    blas_group = f"{groups} x one group's (addmm + GELU in place + addmm), contiguous, preallocated"
    table = Table(f"Attainable: the BLAS on the BD-MLP's shapes (batch {b} x {n} tokens, C={c}, g={groups}, E=8 "
                  "vs dense E=4)", ["what", "ms", "speedup vs timm dense E=4", "speedup vs dense GEMMs+GELU",
                                    "share of its total"])
    totals = {"dense": blas_dense, "group": blas_group}
    for name in fns:
        total = totals["group"] if "group" in name else totals["dense"] if name.startswith("parts: dense") else None
        share = t[name].median / t[total].median if total else math.nan
        table.add(name, ms(t[name]), ratio(t, ref, name), ratio(t, blas_dense, name), share)
    table.notes.append(f"attainable speedup on this BLAS (dense GEMMs+GELU / per-group GEMMs+GELU): "
                       f"{ratio(t, blas_dense, blas_group):.2f}x (the MAC count allows 2x); ours reaches "
                       f"{ratio(t, blas_group, 'ours (SchemeMlp, eval)'):.2f} of the attainable throughput")
    table.notes.append("the reference rows skip what a real kernel pays: strided group inputs, allocating the "
                       "output, and for timm's Mlp allocating the hidden tensor; 'parts' time each op alone "
                       "(shares = median part / median total, do not sum exactly to 1)")
    return table


def _naive_cca(x: torch.Tensor, scale: float) -> torch.Tensor:
    attn = torch.softmax(torch.bmm(x.transpose(1, 2), x) * scale, dim=-1)
    return torch.bmm(x, attn.transpose(1, 2))


# --- 3. whole models ------------------------------------------------------------------------------------

MODEL_LABELS = {
    "deit_tiny_patch16_224": "DeiT-Tiny",
    "swin_tiny_patch4_window7_224": "Swin-T",
    "caformer_s18": "CAFormer-S18",
    "poolformer_s12": "PoolFormer-S12",
    "schemeformer_ppaa_s12_224": "SCHEMEformer PPAA-S12 (vs dense PPAA-S12, E=4)",
}


def dense_model(name: str, **kwargs) -> nn.Module:
    if name.startswith("schemeformer_ppaa_s12"):
        return _dense_ppaa_s12(**kwargs)
    return timm.create_model(name, **kwargs)


def _dense_ppaa_s12(**kwargs) -> nn.Module:
    """The SCHEMEformer's architecture with timm's dense MLPs (MetaFormer fixes E=4): its baseline."""
    from timm.layers import GroupNorm1, LayerNorm
    from timm.models.metaformer import Attention, MetaFormer, Pooling
    return MetaFormer(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), token_mixers=(Pooling, Pooling, Attention, Attention),
                      norm_layers=(GroupNorm1, GroupNorm1, LayerNorm, LayerNorm), downsample_norm=None,
                      mlp_act=nn.GELU, mlp_bias=True, layer_scale_init_values=1e-5,
                      res_scale_init_values=None, use_mlp_head=False, **kwargs)


def scheme_model(name: str, cca: bool = True, **kwargs) -> nn.Module:
    if name.startswith("schemeformer"):
        return timm.create_model(name, scheme_config={"cca": cca}, **kwargs)
    return timm_scheme.scheme_patch(timm.create_model(name, **kwargs), groups=4, expansion=8, cca=cca)


def fused(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timm_scheme.fuse_for_inference(model)
    return model.eval()


def _infer_pair(name: str, batch: int, img: int, settings: Settings, **kwargs) -> Tuple[Dict, float]:
    torch.manual_seed(0)
    size = {} if img == 224 else {"img_size": img}
    dense = dense_model(name, **size, **kwargs).eval()
    scheme = fused(scheme_model(name, **size, **kwargs))
    x = torch.randn(batch, 3, img, img)
    t = compare({"dense": _no_grad(lambda: dense(x)), "scheme": _no_grad(lambda: scheme(x))}, settings)
    return t, ratio(t, "dense", "scheme")


def model_table(plan: Plan, settings: Settings) -> Table:
    table = Table(f"Whole model, inference, batch {plan.batch}, 224 px, fp32: fused SCHEME (g=4, E=8) vs dense "
                  "timm model (E=4)", ["model", "dense img/s", "SCHEME img/s", "throughput ratio"])
    for name in plan.model_names:
        t, r = _infer_pair(name, plan.batch, 224, settings)
        table.add(MODEL_LABELS.get(name, name), plan.batch / t["dense"].median, plan.batch / t["scheme"].median, r)
        gc.collect()
    table.notes.append("target for DeiT-Tiny: >= 1.3x (the MAC count allows about 1.4x)")
    return table


# --- 4. training step -----------------------------------------------------------------------------------

def _train_step(model: nn.Module, batch: int, img: int = 224) -> Callable[[], None]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, img, img)
    y = torch.randint(0, 1000, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def saved_activation_bytes(model: nn.Module, batch: int, img: int = 224) -> int:
    """Bytes autograd keeps for backward in one forward (distinct storages), a deterministic memory measure."""
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(torch.randn(batch, 3, img, img))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    del out
    return sum(v for k, v in seen.items() if k not in params)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _peak_rss_child(kind: str, name: str, batch: int, threads: int, queue) -> None:
    """In a fresh process: build the model, run one training step (optimizer state, allocator warm-up), then
    reset the RSS high-water mark and run a second step; report RSS before it and its peak during it.

    Why not getrusage: ru_maxrss survives exec on Linux (the kernel folds the forked mm's high-water mark,
    i.e. the parent's peak, into it), so a spawned child reported the benchmark process's own multi-GiB peak
    and a growth of 0. VmHWM in /proc/self/status is the child's own address space, and writing 5 to
    /proc/self/clear_refs resets it to the current RSS (Linux >= 4.0). glibc's dynamic mmap threshold is
    pinned (MALLOC_MMAP_THRESHOLD_ in the child's environment) so freed tensors go back to the OS and the
    RSS follows the live tensors instead of what malloc kept from the first step."""
    torch.set_num_threads(threads)
    model = dense_model(name) if kind == "dense" else scheme_model(name, cca=kind == "scheme")
    step = _train_step(model, batch)
    step()
    gc.collect()
    before = _proc_status_kib("VmRSS")
    peak_life = _proc_status_kib("VmHWM")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    step()
    peak_step = _proc_status_kib("VmHWM")
    queue.put((before, max(peak_life, peak_step), peak_step, reset))


def peak_rss_mib(kind: str, name: str, batch: int) -> Tuple[float, float]:
    """(peak RSS of the process, peak RSS growth during one steady-state training step) in MiB, measured in a
    fresh process (see `_peak_rss_child`); growth is nan if the high-water mark could not be reset."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    env_keys = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 20)}
    saved = {k: os.environ.get(k) for k in env_keys}
    os.environ.update(env_keys)  # read by glibc at the child's start; the parent has already started
    try:
        proc = ctx.Process(target=_peak_rss_child, args=(kind, name, batch, torch.get_num_threads(), queue))
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    before, peak, peak_step, reset = queue.get()
    proc.join()
    return peak / 1024, (peak_step - before) / 1024 if reset else math.nan


def train_table(plan: Plan, settings: Settings, name: str = "deit_tiny_patch16_224") -> Table:
    b = plan.train_batch
    table = Table(f"Training step (forward + backward + AdamW), {MODEL_LABELS[name]}, batch {b}, 224 px, fp32",
                  ["model", "ms / step", "time / dense", "activations saved (MiB)", "peak RSS (MiB)",
                   "peak RSS growth in step (MiB)"])
    torch.manual_seed(0)
    models = {"dense timm (E=4)": dense_model(name),
              "SCHEME g=4 E=8 + CCA": scheme_model(name),
              "SCHEME g=4 E=8, no CCA": scheme_model(name, cca=False)}
    steps = {k: _train_step(m, b) for k, m in models.items()}
    t = compare(steps, settings)
    kinds = {"dense timm (E=4)": "dense", "SCHEME g=4 E=8 + CCA": "scheme", "SCHEME g=4 E=8, no CCA": "scheme_no_cca"}
    for label, model in models.items():
        act = saved_activation_bytes(model, b) / 2 ** 20
        rss = peak_rss_mib(kinds[label], name, b) if plan.memory and label in kinds else (math.nan, math.nan)
        table.add(label, ms(t[label]), 1.0 / ratio(t, "dense timm (E=4)", label), act, *rss)
    table.notes.append("target: SCHEME + CCA <= 1.0x the dense step time")
    table.notes.append("activations saved = bytes autograd keeps for backward (distinct storages); peak RSS = "
                       "VmHWM of a fresh process (model, data, two steps); growth = VmHWM during the second step "
                       "(high-water mark reset before it) minus the RSS before it: activations, gradients and "
                       "temporaries of one step")
    return table


# --- 5. torch.compile and bf16 autocast -----------------------------------------------------------------

def compile_amp_table(plan: Plan, settings: Settings, name: str = "deit_tiny_patch16_224") -> Table:
    b = plan.batch
    table = Table(f"{MODEL_LABELS[name]}, batch {b}: torch.compile and bf16 autocast (ratio = dense time / "
                  "SCHEME time)", ["mode", "dense ms", "SCHEME ms", "ratio", "note"])
    torch.manual_seed(0)
    dense = dense_model(name).eval()
    scheme = fused(scheme_model(name))
    x = torch.randn(b, 3, 224, 224)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    modes = {"eager fp32": (dense, scheme, contextlib.nullcontext),
             "eager bf16 autocast": (dense, scheme, bf16)}
    if plan.compile:
        torch._dynamo.reset()
        start = time.perf_counter()
        cd, cs = torch.compile(dense), torch.compile(scheme)
        with torch.no_grad():
            cd(x), cs(x)
        modes["torch.compile fp32 (inductor)"] = (cd, cs, contextlib.nullcontext)
        compile_s = time.perf_counter() - start
    for mode, (md, msch, ctx) in modes.items():
        def run(m, ctx=ctx):
            def f():
                with torch.no_grad(), ctx():
                    m(x)
            return f
        t = compare({"dense": run(md), "scheme": run(msch)}, settings)
        note = f"compile of both took {compile_s:.0f} s" if "compile" in mode else ""
        table.add(mode + ", inference", ms(t["dense"]), ms(t["scheme"]), ratio(t, "dense", "scheme"), note)
    # training step under bf16 autocast
    steps = {}
    for label, m in (("dense", dense_model(name)), ("scheme", scheme_model(name))):
        step = _train_step(m, plan.train_batch)

        def amp_step(step=step):
            with bf16():
                step()
        steps[label] = amp_step
    t = compare(steps, settings)
    table.add(f"eager bf16 autocast, training step (batch {plan.train_batch}, SCHEME with CCA)", ms(t["dense"]),
              ms(t["scheme"]), ratio(t, "dense", "scheme"), "CCA logits stay fp32")
    return table


# --- 6. scaling -----------------------------------------------------------------------------------------

SCALING_SIZES = ((224, 1), (224, 8), (224, 32), (224, 64), (384, 8))  # (image px, batch)
SCALING_TRAIN = ((224, 8), (384, 8))


def scaling_tables(plan: Plan, settings: Settings, name: str = "deit_tiny_patch16_224") -> List[Table]:
    """How the ratios move with batch (1 to 64) and image size (224 to 384 px), and the cost per token of the
    mixer parts (flat = linear in tokens)."""
    mixer = Table(f"Scaling, mixer parts at {MODEL_LABELS[name]} sizes (C=192, g=4, E=8), inference: cost per "
                  "token and the BD-MLP speedup", ["image px", "batch", "tokens / image", "tokens",
                                                   "dense E=4 MLP us / token", "BD-MLP (ours) us / token",
                                                   "BD-MLP speedup vs dense E=4", "CCA us / token",
                                                   "CCA / dense MLP time", "BD-MLP us / token vs 224 px b32",
                                                   "CCA us / token vs 224 px b32"])
    torch.manual_seed(0)
    dense4, _, scheme, _ = _block_modules(C_TINY)
    scheme.eval()
    cca = ChannelCovarianceAttention(scheme.hidden_features ** -0.5)
    rows = []
    for img, b in SCALING_SIZES:
        n = (img // 16) ** 2 + 1
        x = torch.randn(b, n, C_TINY)
        t = compare({"dense": _no_grad(lambda: dense4(x)), "ours": _no_grad(lambda: scheme(x)),
                     "cca": _no_grad(lambda: cca(x))}, settings)
        per_tok = {k: t[k].median / (b * n) * 1e6 for k in t}
        rows.append((img, b, n, b * n, per_tok["dense"], per_tok["ours"], ratio(t, "dense", "ours"),
                     per_tok["cca"], ratio(t, "cca", "dense")))
    ref = next(r for r in rows if r[:2] == (224, 32))
    for r in rows:
        mixer.add(*r, r[5] / ref[5], r[7] / ref[7])
    mixer.notes.append("us / token = median time per call / (batch x tokens); CCA = the channel covariance "
                       "attention forward alone (its C x C logits per sample: linear in tokens, per-token cost "
                       "flat once the batch fills the GEMMs)")

    model = Table(f"Scaling, {MODEL_LABELS[name]}: fused SCHEME (g=4, E=8) vs dense timm (E=4)",
                  ["image px", "batch", "tokens / image", "dense ms / image", "SCHEME ms / image",
                   "inference ratio (dense t / SCHEME t)", "training step: SCHEME + CCA t / dense t"])
    for img, b in SCALING_SIZES:
        t, r_inf = _infer_pair(name, b, img, settings)
        r_train = math.nan
        if (img, b) in SCALING_TRAIN:
            size = {} if img == 224 else {"img_size": img}
            torch.manual_seed(0)
            steps = {"dense": _train_step(dense_model(name, **size), b, img),
                     "scheme": _train_step(scheme_model(name, **size), b, img)}
            r_train = 1.0 / ratio(compare(steps, settings), "dense", "scheme")
            del steps
        model.add(img, b, (img // 16) ** 2 + 1, ms(t["dense"]) / b, ms(t["scheme"]) / b, r_inf, r_train)
        gc.collect()
    model.notes.append("inference target at 224 px, batch 32: >= 1.3x; training target: <= 1.0x")
    return [mixer, model]


# --- 6b. families read through adapters ---------------------------------------------------------------------

def adapted_table(plan: Plan, settings: Settings) -> Table:
    """Whole-model inference of families with their own MLP class: dense against fused SCHEME (g=4, E=8) with
    the fused kernels (the adapter's declared structure, BatchNorms folded) and with the family's forward run
    layer by layer."""
    b = plan.batch
    table = Table(f"Families read through adapters, inference, batch {b}, 224 px: dense (their E) vs fused SCHEME "
                  "(g=4, E=8)", ["model", "dense ms", "SCHEME ms (fused kernels)", "SCHEME ms (layer by layer)",
                                 "dense / SCHEME", "layer by layer / fused kernels"])
    for name in plan.adapted_models:
        torch.manual_seed(0)
        x = torch.randn(b, 3, 224, 224)
        dense = dense_model(name).eval()
        scheme = fused(scheme_model(name))
        layered = fused(scheme_model(name))
        for mixer in timm_scheme.scheme_mixers(layered).values():
            mixer.kernel_plan = None  # the family's own forward, each projection its own block-diagonal layer
        t = compare({"dense": _no_grad(lambda: dense(x)), "scheme": _no_grad(lambda: scheme(x)),
                     "layered": _no_grad(lambda: layered(x))}, settings)
        table.add(name, ms(t["dense"]), ms(t["scheme"]), ms(t["layered"]), ratio(t, "dense", "scheme"),
                  ratio(t, "layered", "scheme"))
        gc.collect()
    table.notes.append("fused kernels: SCHEME's token-tiled block-diagonal MLP kernel, the hidden and output "
                       "BatchNorms folded into the projections (LeViT, EfficientViT-MSRA), or the input norm first "
                       "(TinyViT); layer by layer: the family's forward with block-diagonal projections")
    return table


# --- 7. int8 quantization ---------------------------------------------------------------------------------

def _int8_pair(name: str, mechanism: str) -> Tuple[nn.Module, nn.Module]:
    """(dense, fused SCHEME) DeiT-Tiny quantized alike: "torchao" (Int8DynamicActivationInt8WeightConfig on the
    nn.Linear layers, ours on the block-diagonal ones) or "torch.ao" (quantize_dynamic: fbgemm's dynamic Linear,
    and per group on the block-diagonal ones)."""
    from timm_scheme.quantize import quantize_dynamic_int8, quantize_int8
    torch.manual_seed(0)
    dense = dense_model(name).eval()
    scheme = fused(scheme_model(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        if mechanism == "torchao":
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
            quantize_(dense, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
            return dense, quantize_int8(scheme)
        from torch.ao.quantization import quantize_dynamic
        return quantize_dynamic(dense, {nn.Linear}, dtype=torch.qint8), quantize_dynamic_int8(scheme)


def quantized_table(plan: Plan, settings: Settings, name: str = "deit_tiny_patch16_224") -> Table:
    """Whole-model inference in fp32 and int8 (dynamic activation quantization), dense against fused SCHEME."""
    b = plan.batch
    table = Table(f"Whole model, int8 inference, batch {b}, 224 px: {MODEL_LABELS[name]} dense (E=4) vs fused "
                  "SCHEME (g=4, E=8), each quantized alike", ["precision", "dense ms", "SCHEME ms",
                                                               "dense / SCHEME (throughput ratio)",
                                                               "dense: speedup over fp32", "SCHEME: speedup over fp32"])
    torch.manual_seed(0)
    x = torch.randn(b, 3, 224, 224)
    models = {"fp32": (dense_model(name).eval(), fused(scheme_model(name)))}
    if importlib.util.find_spec("torchao") is not None:  # a dev extra
        models["int8, torchao"] = _int8_pair(name, "torchao")
    models["int8, torch.ao"] = _int8_pair(name, "torch.ao")
    fns = {}
    for label, (dense, scheme) in models.items():
        fns[f"dense {label}"] = _no_grad(lambda m=dense: m(x))
        fns[f"scheme {label}"] = _no_grad(lambda m=scheme: m(x))
    # our int8 layers alone: SCHEME's block-diagonal layers int8, every nn.Linear fp32, against fp32 dense
    from timm_scheme.quantize import quantize_dynamic_int8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bd_only = quantize_dynamic_int8(fused(scheme_model(name)), linear=False, inplace=True)
    fns["scheme bd-only"] = _no_grad(lambda: bd_only(x))
    t = compare(fns, settings)
    for label in models:
        d, s = f"dense {label}", f"scheme {label}"
        table.add(label, ms(t[d]), ms(t[s]), ratio(t, d, s), ratio(t, "dense fp32", d), ratio(t, "scheme fp32", s))
    table.add("SCHEME: block-diagonal layers int8, nn.Linear fp32 (dense: fp32)", ms(t["dense fp32"]),
              ms(t["scheme bd-only"]), ratio(t, "dense fp32", "scheme bd-only"), 1.0,
              ratio(t, "scheme fp32", "scheme bd-only"))
    table.notes.append("target: dense / SCHEME >= 1.3x in int8 (the float ratio is on the fp32 row)")
    table.notes.append("int8, torchao: torchao's Int8DynamicActivationInt8WeightConfig on every nn.Linear of both "
                       "models (int8 weights per channel, activations per token), timm_scheme.quantize.quantize_int8 "
                       "adding the block-diagonal layers (int8 weights per group and channel, activations per "
                       "token and group, torch._int_mm per group)")
    table.notes.append("int8, torch.ao: torch.ao.quantization.quantize_dynamic on every nn.Linear of both models "
                       "(fbgemm/onednn, per-tensor activation scales), quantize_dynamic_int8 adding the "
                       "block-diagonal layers (the same int8 weights, torch.ao's dynamic Linear op per group)")
    table.notes.append("last row: the block-diagonal layers alone int8 (quantize_dynamic_int8, linear=False), "
                       "every nn.Linear fp32, against the fp32 dense model")
    table.notes.append("patch embedding, attention matmuls, norms and GELU stay fp32 in every row")
    return table
