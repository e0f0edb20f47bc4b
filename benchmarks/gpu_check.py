"""One command that checks SCHEME on an accelerator: correctness against float64 CPU references, then speed and
memory side by side against the dense models. Prepared to run as is whenever a GPU is at hand.

    python -m benchmarks.gpu_check                      # CUDA: the full check, a few minutes on one GPU
    python -m benchmarks.gpu_check --device cpu --quick # the CI smoke run: tiny sizes, every section

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/check-<device>-<date>``) with the device
name, versions and settings. Exit status 1 if a correctness check fails.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python benchmarks/gpu_check.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import timm  # noqa: E402
from timm.layers import Mlp  # noqa: E402

import timm_scheme  # noqa: E402
from timm_scheme import BlockDiagonalConv1x1, BlockDiagonalLinear, ChannelCovarianceAttention, SchemeMlp  # noqa: E402
from timm_scheme.kernels import dispatch, mlp_batched, mlp_grouped_mm, mlp_per_group  # noqa: E402

from benchmarks.harness import Settings, Table, compare, machine, ms, ratio  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Check:
    name: str
    error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound


@dataclass
class Report:
    checks: List[Check] = field(default_factory=list)
    tables: List[Table] = field(default_factory=list)

    def check(self, name: str, got: torch.Tensor, want: torch.Tensor, bound: float) -> None:
        want = want.double().cpu()
        error = float((got.detach().double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30))
        self.checks.append(Check(name, error, bound))
        print(f"  {'ok  ' if error <= bound else 'FAIL'} {name}: {error:.2e} (bound {bound:g})", flush=True)


# --- correctness: the device against float64 on the CPU ------------------------------------------------------

def _twin(module: torch.nn.Module, device: str) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """(float64 CPU reference, float32 copy on the device) of the same module."""
    return copy.deepcopy(module).double(), copy.deepcopy(module).float().to(device)


def _forward_backward(module: torch.nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    x = x.detach().requires_grad_()
    y = module(x)
    grads = torch.autograd.grad(y.float().square().mean(), [x, *module.parameters()])
    return y, list(grads)


def correctness(report: Report, device: str, tokens: int, width: int) -> None:
    print("correctness (max |device - float64 CPU| / max |reference|):", flush=True)
    torch.manual_seed(0)
    groups = 4
    cases = {
        "BlockDiagonalLinear": (BlockDiagonalLinear(width, 2 * width, groups), torch.randn(2, tokens, width)),
        "BlockDiagonalConv1x1": (BlockDiagonalConv1x1(width, 2 * width, groups), torch.randn(2, width, 8, 8)),
        "ChannelCovarianceAttention": (ChannelCovarianceAttention(width ** -0.5), torch.randn(2, tokens, width)),
    }
    for gated in (False, True):
        for use_conv in (False, True):
            mixer = SchemeMlp(width, 4 * width, groups=groups, gated=gated, use_conv=use_conv, act_layer=torch.nn.GELU)
            with torch.no_grad():
                mixer.mix_logits.copy_(torch.tensor([0.3, -0.4]))
            x = torch.randn(2, width, 8, 8) if use_conv else torch.randn(2, tokens, width)
            cases[f"SchemeMlp gated={gated} conv={use_conv}"] = (mixer, x)
    shuffled = SchemeMlp(width, 4 * width, groups=groups, gated=True, act_layer=torch.nn.GELU, channel_shuffle=True)
    cases["SchemeMlp gated=True channel_shuffle"] = (shuffled, torch.randn(2, tokens, width))
    shuffled_conv = SchemeMlp(width, 4 * width, groups=groups, use_conv=True, channel_shuffle=True)
    cases["SchemeMlp conv=True channel_shuffle"] = (shuffled_conv, torch.randn(2, width, 8, 8))
    chosen = dispatch.accelerator_kernel()
    try:
        for form in dispatch.ACCELERATOR_KERNELS:  # every eager form the dispatch may run on the device
            dispatch.set_accelerator_kernel(form)
            for name, (module, x) in cases.items():
                modes = ("train", "eval", "fused") if isinstance(module, SchemeMlp) else ("train",)
                for mode in modes:
                    reference, on_device = _twin(module, device)
                    for m in (reference, on_device):
                        m.train(mode == "train")
                        if mode == "fused":
                            m.fuse()
                    want, want_grads = _forward_backward(reference, x.double())
                    got, got_grads = _forward_backward(on_device, x.to(device))
                    with torch.no_grad():  # without autograd: what grouped_mm runs (with it, batched)
                        got_inference = on_device(x.to(device))
                    label = f"{name}, {mode}, {form}"
                    report.check(f"{label}, float32 output", got, want, 1e-5)
                    report.check(f"{label}, float32 output without autograd", got_inference, want, 1e-5)
                    worst = max(range(len(want_grads)), key=lambda i: float(
                        (got_grads[i].double().cpu() - want_grads[i]).abs().max() / want_grads[i].abs().max()))
                    report.check(f"{label}, float32 gradients", got_grads[worst], want_grads[worst], 1e-4)
    finally:
        dispatch.set_accelerator_kernel(chosen)
    _int8_checks(report, device, tokens, width)
    _autocast_checks(report, device, tokens, width)
    _compile_checks(report, device, tokens, width)


def _int8_checks(report: Report, device: str, tokens: int, width: int) -> None:
    """The int8 layers on the device (cuBLASLt's int8 GEMM, one tile) against the dequantized product computed
    in float64 on the CPU: the same integers, so float rounding only."""
    from timm_scheme.kernels.int8 import quantize_per_row
    from timm_scheme.layers.int8 import Int8BlockDiagonalLinear

    torch.manual_seed(0)
    for rows in (tokens, 8):  # 8 rows: below cuBLASLt's minimum, the exact float fallback
        layer = Int8BlockDiagonalLinear.from_float(BlockDiagonalLinear(width, 2 * width, 4))
        x = torch.randn(rows, width)
        q, scale = quantize_per_row(x.view(rows, 4, -1))
        w = layer.weight_int8.double() * layer.weight_scale.double().unsqueeze(-1)
        want = torch.einsum("rgi,goi->rgo", q.double() * scale.double(), w).reshape(rows, -1) + layer.bias.double()
        got = layer.to(device)(x.to(device))
        report.check(f"Int8BlockDiagonalLinear, {rows} rows, output", got, want, 1e-5)


def _autocast_checks(report: Report, device: str, tokens: int, width: int) -> None:
    torch.manual_seed(0)
    mixer = SchemeMlp(width, 4 * width, groups=4).train()
    x = torch.randn(2, tokens, width)
    reference, on_device = _twin(mixer, device)
    want, _ = _forward_backward(reference, x.double())
    for dtype, bound in ((torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype):
            got, grads = _forward_backward(on_device, x.to(device))
        report.check(f"SchemeMlp train, {str(dtype)[6:]} autocast output", got.float(), want, bound)
        finite = all(torch.isfinite(g).all() for g in grads)
        report.checks.append(Check(f"SchemeMlp train, {str(dtype)[6:]} autocast gradients finite",
                                   0.0 if finite else float("inf"), 0.0))


def _compile_checks(report: Report, device: str, tokens: int, width: int) -> None:
    torch.manual_seed(0)
    for use_conv in (False, True):
        mixer = SchemeMlp(width, 4 * width, groups=4, use_conv=use_conv).train().to(device)
        x = (torch.randn(2, width, 8, 8) if use_conv else torch.randn(2, tokens, width)).to(device)
        eager = _forward_backward(mixer, x)
        compiled = _forward_backward(torch.compile(mixer), x)
        report.check(f"SchemeMlp conv={use_conv}, torch.compile (inductor) output", compiled[0], eager[0], 1e-4)
        report.check(f"SchemeMlp conv={use_conv}, torch.compile gradients", compiled[1][1], eager[1][1], 1e-3)


# --- speed and memory, side by side ---------------------------------------------------------------------------

def _precision(dtype: torch.dtype, device: str):
    if dtype is torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def _inference(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, device: str) -> Callable[[], object]:
    def run():
        with torch.no_grad(), _precision(dtype, device):
            return model(x)
    return run


def block_speed(report: Report, settings: Settings, device: str, batch: int, dtypes, compiled: bool) -> None:
    c, tokens, groups = 192, 197, 4
    table = Table(f"BD-MLP (g={groups}, E=8, fused) vs timm's dense E=4 Mlp, inference, DeiT-Tiny width, "
                  f"batch {batch} x {tokens} tokens", ["precision", "form", "dense ms", "BD-MLP ms", "speedup",
                                                      "per-group / batched", "grouped_mm / batched",
                                                      "fastest accelerator form", "channel shuffle cost"])
    torch.manual_seed(0)
    dense = Mlp(c, 4 * c).to(device).eval()
    scheme = SchemeMlp(c, 8 * c, groups=groups, cca=False).to(device).eval()
    shuffled = SchemeMlp(c, 8 * c, groups=groups, cca=False, channel_shuffle=True).to(device).eval()
    x = torch.randn(batch, tokens, c, device=device)
    w1, b1, w2, b2 = scheme.fc1.weight, scheme.fc1.bias, scheme.fc2.weight, scheme.fc2.bias
    for dtype in dtypes:
        forms = [("eager", dense, scheme, shuffled)] + (
            [("compiled", torch.compile(dense), torch.compile(scheme), torch.compile(shuffled))] if compiled else [])
        for form, d, s, sh in forms:
            fns = {"dense": _inference(d, x, dtype, device), "scheme": _inference(s, x, dtype, device),
                   "shuffled": _inference(sh, x, dtype, device),
                   "batched": _inference(lambda t: mlp_batched(t, w1, b1, w2, b2, F.gelu), x, dtype, device),
                   "per_group": _inference(lambda t: mlp_per_group(t, w1, b1, w2, b2, F.gelu), x, dtype, device)}
            with _precision(dtype, device):
                grouped = dispatch.grouped_mm_supported(x, w1)
            if grouped:
                fns["grouped_mm"] = _inference(lambda t: mlp_grouped_mm(t, w1, b1, w2, b2, F.gelu), x, dtype, device)
            t = compare(fns, settings)
            forms = [f for f in dispatch.ACCELERATOR_KERNELS if f in t]
            fastest = min(forms, key=lambda f: t[f].median)
            table.add(str(dtype)[6:], form, ms(t["dense"]), ms(t["scheme"]), ratio(t, "dense", "scheme"),
                      ratio(t, "per_group", "batched"), ratio(t, "grouped_mm", "batched") if grouped else "n/a",
                      fastest, ratio(t, "shuffled", "scheme"))
    table.notes.append("speedup = median over interleaved rounds of t(dense) / t(BD-MLP); per-group / batched and "
                       "grouped_mm / batched: time ratios of the accelerator forms (> 1: batched is faster; "
                       "grouped_mm where the device and dtype have it); the fastest form is what "
                       "dispatch.set_accelerator_kernel (or TIMM_SCHEME_ACCELERATOR_KERNEL) should be set to for "
                       "inference; channel shuffle cost = t(shuffled BD-MLP) / t(BD-MLP)")
    report.tables.append(table)


def _dense_metaformer() -> torch.nn.Module:
    from timm.layers import GroupNorm1, LayerNorm
    from timm.models.metaformer import Attention, MetaFormer, Pooling
    return MetaFormer(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), token_mixers=(Pooling, Pooling, Attention, Attention),
                      norm_layers=(GroupNorm1, GroupNorm1, LayerNorm, LayerNorm), downsample_norm=None,
                      mlp_act=torch.nn.GELU, mlp_bias=True, layer_scale_init_values=1e-5, res_scale_init_values=None,
                      use_mlp_head=False)


def _model_pair(name: str, size: int) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """(dense timm model, fused SCHEME g=4, E=8 model) at the given input size."""
    if name.startswith("schemeformer"):
        scheme = timm.create_model(name)
        dense = _dense_metaformer()
    else:
        kwargs = {"img_size": size} if "swin" in name or "deit" in name else {}
        dense = timm.create_model(name, **kwargs)
        scheme = timm_scheme.scheme_patch(copy.deepcopy(dense), groups=4, expansion=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        timm_scheme.fuse_for_inference(scheme)
    return dense.eval(), scheme.eval()


def model_speed(report: Report, settings: Settings, device: str, names, batches, size: int, dtypes,
                compiled: bool) -> None:
    table = Table(f"Whole model, inference, fused SCHEME (g=4, E=8) vs dense, {size} px",
                  ["model", "batch", "precision", "form", "dense ms", "SCHEME ms", "speedup", "peak MiB dense / SCHEME"])
    for name in names:
        dense, scheme = (m.to(device) for m in _model_pair(name, size))
        for batch in batches:
            x = torch.randn(batch, 3, size, size, device=device)
            for dtype in dtypes:
                forms = [("eager", dense, scheme)] + ([("compiled", torch.compile(dense), torch.compile(scheme))]
                                                      if compiled else [])
                for form, d, s in forms:
                    fns = {"dense": _inference(d, x, dtype, device), "scheme": _inference(s, x, dtype, device)}
                    t = compare(fns, settings)
                    table.add(name, batch, str(dtype)[6:], form, ms(t["dense"]), ms(t["scheme"]),
                              ratio(t, "dense", "scheme"), _peaks(device, fns))
        del dense, scheme
    report.tables.append(table)


def train_speed(report: Report, settings: Settings, device: str, batch: int, size: int, dtypes) -> None:
    table = Table(f"Training step (forward, backward, AdamW), DeiT-Tiny at {size} px, batch {batch}: SCHEME with "
                  "CCA vs dense", ["precision", "dense ms", "SCHEME ms", "time SCHEME / dense (lower is better)",
                                   "peak MiB dense / SCHEME"])
    torch.manual_seed(0)
    dense = timm.create_model("deit_tiny_patch16_224", img_size=size).to(device)
    scheme = timm_scheme.scheme_patch(copy.deepcopy(dense), groups=4, expansion=8).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step_of(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with _precision(dtype, device):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    for dtype in dtypes:
        fns = {"dense": step_of(dense.train()), "scheme": step_of(scheme.train())}
        t = compare(fns, settings)
        table.add(str(dtype)[6:], ms(t["dense"]), ms(t["scheme"]), ratio(t, "scheme", "dense"), _peaks(device, fns))
    report.tables.append(table)


def _peaks(device: str, fns: Dict[str, Callable[[], object]]) -> str:
    """Peak memory of one call of each (torch.cuda.max_memory_allocated); n/a off CUDA."""
    if not device.startswith("cuda"):
        return "n/a"
    peaks = []
    for name in ("dense", "scheme"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fns[name]()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() / 2 ** 20)
    return f"{peaks[0]:.0f} / {peaks[1]:.0f}"


# --- the command ----------------------------------------------------------------------------------------------

def _run_all(report: Report, settings: Settings, device: str, quick: bool, compiled: bool) -> None:
    correctness(report, device, tokens=16 if quick else 197, width=32 if quick else 192)
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    print("speed:", flush=True)
    block_speed(report, settings, device, batch=2 if quick else 256, dtypes=dtypes, compiled=compiled and not quick)
    model_speed(report, settings, device,
                names=("deit_tiny_patch16_224",) if quick else ("deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
                                                                "caformer_s18", "schemeformer_ppaa_s12_224"),
                batches=(2,) if quick else (128, 256), size=32 if quick else 224, dtypes=dtypes,
                compiled=compiled and not quick)
    train_speed(report, settings, device, batch=2 if quick else 128, size=32 if quick else 224, dtypes=dtypes)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one model, few rounds (the CPU smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    device = args.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here; use --device cpu for the smoke run")
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 checks against float64 need true float32 GEMMs
        torch.backends.cudnn.allow_tf32 = False
    started = time.time()
    settings = Settings(rounds=args.rounds or (2 if args.quick else 7), sample_seconds=0.02 if args.quick else 0.3,
                        device=device)
    report = Report()
    quick = args.quick
    # on the CPU (the smoke run) CPU tensors take the accelerator forms, so the run covers what a GPU would run
    with dispatch.cpu_as_accelerator() if device == "cpu" else contextlib.nullcontext():
        _run_all(report, settings, device, quick, compiled=not args.no_compile)
    failed = [c for c in report.checks if not c.ok]
    header = dict(machine(), device=device, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  quick=quick, rounds=settings.rounds, seconds=round(time.time() - started, 1),
                  accelerator_kernel=dispatch.accelerator_kernel(), checks_failed=len(failed))
    if device.startswith("cuda"):
        header["gpu"] = torch.cuda.get_device_name()
        header["cuda"] = torch.version.cuda
    lines = [f"# SCHEME check on {header.get('gpu', device)}", "",
             ", ".join(f"{k}: {v}" for k, v in header.items()), "",
             f"## Correctness: {len(report.checks) - len(failed)} of {len(report.checks)} checks pass", "",
             "| check | error | bound | |", "|---|---|---|---|"]
    lines += [f"| {c.name} | {c.error:.2e} | {c.bound:g} | {'ok' if c.ok else 'FAIL'} |" for c in report.checks]
    lines += ["", "## Speed and memory", ""] + [t.markdown() for t in report.tables]
    stem = Path(args.out) if args.out else RESULTS / f"check-{device.split(':')[0]}-{header['date'][:10]}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(dict(header=header, checks=[vars(c) for c in report.checks],
                                                         tables=[t.to_dict() for t in report.tables]), indent=2))
    print("\n".join(lines))
    print(f"wrote {stem}.md and {stem}.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
