"""The "attainable" tables of section ``block``: the dense MLP's bare ops against g x the same ops on one group's
shapes (inference, and forward + backward), i.e. the speedup this BLAS allows on these shapes."""
from __future__ import annotations

import math

import torch
from torch import nn

from timm_scheme.layers import SchemeMlp

from ..harness import Settings, Table, compare, ms, ratio
from .common import Plan, scheme_variant, without_grad


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
            scheme_variant(scheme, "unfused"), list(scheme.parameters())),
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
    t = compare({k: without_grad(f) if k.startswith(("dense E=4: bare", f"{g}: bare", "parts")) else f
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
    t = compare({k: without_grad(f) for k, f in fns.items()}, settings)
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
