"""The benchmark cases: kernels, the BD-MLP block, CCA, whole models (inference and a training step),
torch.compile / bf16, and how the ratios scale with image size and batch."""
from __future__ import annotations

import contextlib
import gc
import json
import math
import multiprocessing as mp
import resource
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import timm
import timm_scheme
import timm_scheme.layers.block_diagonal as bd
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
            "F.linear per group + cat": lambda: bd._linear_per_group(x, w, b),
            "batched bmm on (g, tokens, c) view": lambda: bd._linear_batched(x, w, b),
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
        return lambda x: bd._mlp_tokens_unfused(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, F.gelu)
    if kernel == "batched":
        return lambda x: bd._mlp_tokens_batched(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, F.gelu)
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
        "per-group F.linear->GELU->F.linear + cat": lambda: _scheme_variant(scheme, "unfused")(x),
        "2 batched bmm": lambda: _scheme_variant(scheme, "batched")(x),
        "layered: BlockDiagonalLinear, GELU, BlockDiagonalLinear": lambda: _scheme_variant(scheme, "layered")(x),
    }
    t = compare({k: _no_grad(f) for k, f in fns.items()}, settings)
    ref, conv_name = "dense E=4 (timm Mlp)", "grouped 1x1 Conv2d, E=8 (authors' kernel)"
    for name in fns:
        infer.add(name, ms(t[name]), ratio(t, ref, name), ratio(t, conv_name, name))
    infer.notes.append("targets: ours >= 1.6x dense E=4 and >= 3x the grouped Conv2d")

    train = Table(f"BD-MLP block and CCA, training (forward + backward), batch {b} x {n} tokens, fp32",
                  ["kernel", "ms", "time / dense E=4"])
    scheme.train()
    with_cca = SchemeMlp(c, 8 * c, groups=4, cca=True).train()
    cca = ChannelCovarianceAttention(with_cca.cca.scale)
    p_dense, p_scheme, p_cca = list(dense4.parameters()), list(scheme.parameters()), list(with_cca.parameters())
    fns = {
        "dense E=4 (timm Mlp)": _fwd_bwd(dense4, x, p_dense),
        "grouped 1x1 Conv2d, E=8": _fwd_bwd(conv, x_nchw, list(conv.parameters())),
        "ours (SchemeMlp default)": _fwd_bwd(scheme, x, p_scheme),
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
    return [infer, train]


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


def _peak_rss_child(kind: str, name: str, batch: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    model = dense_model(name) if kind == "dense" else scheme_model(name)
    step = _train_step(model, batch)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    step()
    queue.put((base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def peak_rss_mib(kind: str, name: str, batch: int) -> Tuple[float, float]:
    """(peak RSS, growth of the peak during two training steps) in MiB, in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(kind, name, batch, torch.get_num_threads(), queue))
    proc.start()
    base, peak = queue.get()
    proc.join()
    return peak / 1024, (peak - base) / 1024


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
    kinds = {"dense timm (E=4)": "dense", "SCHEME g=4 E=8 + CCA": "scheme"}
    for label, model in models.items():
        act = saved_activation_bytes(model, b) / 2 ** 20
        rss = peak_rss_mib(kinds[label], name, b) if plan.memory and label in kinds else (math.nan, math.nan)
        table.add(label, ms(t[label]), 1.0 / ratio(t, "dense timm (E=4)", label), act, *rss)
    table.notes.append("target: SCHEME + CCA <= 1.0x the dense step time")
    table.notes.append("activations saved = bytes autograd keeps for backward (distinct storages); peak RSS is "
                       "the process high-water mark in a fresh process running two steps")
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

def scaling_tables(plan: Plan, settings: Settings, name: str = "deit_tiny_patch16_224") -> List[Table]:
    infer = Table(f"Scaling, {MODEL_LABELS[name]}: fused SCHEME vs dense inference and training-step ratios",
                  ["image px", "batch", "tokens / image", "inference ratio (dense t / SCHEME t)",
                   "training ratio (SCHEME + CCA t / dense t)"])
    sizes = [(224, 1), (224, 8), (224, 32), (224, 64), (384, 32)]
    train_sizes = {(224, 8), (224, 32), (384, 8)}
    for img, b in sizes + [(384, 8)]:
        r_inf = math.nan
        if (img, b) in sizes:
            _, r_inf = _infer_pair(name, b, img, settings)
        r_train = math.nan
        if (img, b) in train_sizes:
            size = {} if img == 224 else {"img_size": img}
            torch.manual_seed(0)
            steps = {"dense": _train_step(dense_model(name, **size), b, img),
                     "scheme": _train_step(scheme_model(name, **size), b, img)}
            r_train = 1.0 / ratio(compare(steps, settings), "dense", "scheme")
        infer.add(img, b, (img // 16) ** 2 + 1, r_inf, r_train)
        gc.collect()

    per_token = Table("Cost per token of the mixer parts (should be flat: linear in tokens), C=192, g=4, E=8",
                      ["part", "batch", "tokens / sample", "us / token", "us / token, relative to first row"])
    torch.manual_seed(0)
    _, _, scheme, _ = _block_modules(C_TINY)
    scheme.eval()
    cca = ChannelCovarianceAttention(scheme.hidden_features ** -0.5)
    for part, fn in (("BD-MLP, fused, inference", scheme), ("CCA forward", cca)):
        first = None
        for b, n in ((1, 197), (8, 197), (64, 197), (1, 577), (8, 577), (64, 577)):
            x = torch.randn(b, n, C_TINY)
            t = compare({"x": _no_grad(lambda: fn(x))}, settings)["x"]
            us = t.median / (b * n) * 1e6
            first = first or us
            per_token.add(part, b, n, us, us / first)
    return [infer, per_token]
