"""Sections ``block`` and ``shuffle``: the BD-MLP block against timm's dense MLPs and the grouped 1x1 Conv2d,
inference and training, CCA alone; the channel shuffle's cost."""
from __future__ import annotations

import statistics
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

import timm
import timm_scheme.kernels.block_diagonal as bd
from timm_scheme.layers import ChannelCovarianceAttention, SchemeMlp

from ..harness import Settings, Table, compare, ms, ratio
from .attainable import attainable_table, attainable_train_table
from .common import C_TINY, TOKENS_TINY, Plan, forward_backward, scheme_variant, without_grad


def block_modules(c: int, groups: int = 4):
    torch.manual_seed(0)
    dense4 = timm.layers.Mlp(c, 4 * c)
    dense8 = timm.layers.Mlp(c, 8 * c)
    scheme = SchemeMlp(c, 8 * c, groups=groups, cca=False)
    conv = nn.Sequential(nn.Conv2d(c, 8 * c, 1, groups=groups), nn.GELU(), nn.Conv2d(8 * c, c, 1, groups=groups))
    return dense4, dense8, scheme, conv


def block_tables(plan: Plan, settings: Settings) -> List[Table]:
    b, n, c = plan.batch, TOKENS_TINY, C_TINY
    dense4, dense8, scheme, conv = block_modules(c)
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
            lambda: scheme_variant(scheme, "tiled")(x),
        "per-group F.linear->GELU->F.linear + cat": lambda: scheme_variant(scheme, "unfused")(x),
        "per-group F.linear->GELU in place->F.linear + cat": lambda: scheme_variant(scheme, "unfused_inplace")(x),
        "2 batched bmm": lambda: scheme_variant(scheme, "batched")(x),
        "layered: BlockDiagonalLinear, GELU, BlockDiagonalLinear": lambda: scheme_variant(scheme, "layered")(x),
    }
    t = compare({k: without_grad(f) for k, f in fns.items()}, settings)
    ref, conv_name = "dense E=4 (timm Mlp)", "grouped 1x1 Conv2d, E=8 (authors' kernel)"
    for name in fns:
        infer.add(name, ms(t[name]), ratio(t, ref, name), ratio(t, conv_name, name))
    infer.notes.append("targets: ours >= 1.6x dense E=4 and >= 3x the grouped Conv2d")
    infer.notes.append(f"'ours' is what SchemeMlp.eval() runs at {torch.get_num_threads()} thread(s); the tiled and "
                       "the per-group + cat kernels are also timed directly (kernels/mlp.py runs the tiled one, "
                       "its tile size picked by thread count)")
    attainable = attainable_table(plan, settings, dense4, scheme, x)

    train = Table(f"BD-MLP block and CCA, training (forward + backward), batch {b} x {n} tokens, fp32",
                  ["kernel", "ms", "time / dense E=4"])
    scheme.train()
    with_cca = SchemeMlp(c, 8 * c, groups=4, cca=True).train()
    cca = ChannelCovarianceAttention(with_cca.cca.scale)
    p_dense, p_scheme, p_cca = list(dense4.parameters()), list(scheme.parameters()), list(with_cca.parameters())
    fns = {
        "dense E=4 (timm Mlp)": forward_backward(dense4, x, p_dense),
        "grouped 1x1 Conv2d, E=8": forward_backward(conv, x_nchw, list(conv.parameters())),
        "ours (SchemeMlp default: per-group autograd.Function, slice-wise backward)":
            forward_backward(scheme, x, p_scheme),
        "ours, recompute_hidden=True (tiled, hidden recomputed in backward)":
            forward_backward(scheme_variant(scheme, "recompute"), x, p_scheme),
        "per-group F.linear->GELU->F.linear + cat": forward_backward(scheme_variant(scheme, "unfused"), x, p_scheme),
        "2 batched bmm": forward_backward(scheme_variant(scheme, "batched"), x, p_scheme),
        "CCA alone (ours, 3-GEMM backward)": forward_backward(cca, x, []),
        "CCA alone, plain autograd": forward_backward(lambda t: _naive_cca(t, cca.scale), x, []),
        "ours: BD-MLP + CCA (SchemeMlp, training)": forward_backward(with_cca, x, p_cca),
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
            ("inference", {"unshuffled (SchemeMlp, eval)": without_grad(lambda: plain.eval()(x)),
                           "shuffled (SchemeMlp, eval)": without_grad(lambda: shuffled.eval()(x)),
                           "shuffled by copying the hidden tensor": without_grad(lambda: copied(x))}),
            ("training", {"unshuffled (SchemeMlp, eval)": forward_backward(plain.train(), x, plain_params),
                          "shuffled (SchemeMlp, eval)": forward_backward(shuffled.train(), x, shuffled_params),
                          "shuffled by copying the hidden tensor": forward_backward(copied, x, shuffled_params)})):
        t = compare(fns, settings)
        for name in fns:
            shown = name.replace("eval", "training") if label == "training" else name
            table.add(label, shown, ms(t[name]), 1.0 / ratio(t, "unshuffled (SchemeMlp, eval)", name))
    table.notes.append("the shuffled kernels write each group's hidden units to their shuffled places in the "
                       "token tile (inference) or in the saved hidden tensor (training); no separate pass")
    return table


def _naive_cca(x: torch.Tensor, scale: float) -> torch.Tensor:
    attn = torch.softmax(torch.bmm(x.transpose(1, 2), x) * scale, dim=-1)
    return torch.bmm(x, attn.transpose(1, 2))
