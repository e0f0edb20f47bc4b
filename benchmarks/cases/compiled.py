"""Section ``compile``: torch.compile (inductor) and bf16 autocast, SCHEME against dense."""
from __future__ import annotations

import contextlib
import time

import torch

from ..harness import Settings, Table, compare, ms, ratio
from .common import Plan
from .models import MODEL_LABELS, dense_model, fused, scheme_model
from .training import train_step


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
        step = train_step(m, plan.train_batch)

        def amp_step(step=step):
            with bf16():
                step()
        steps[label] = amp_step
    t = compare(steps, settings)
    table.add(f"eager bf16 autocast, training step (batch {plan.train_batch}, SCHEME with CCA)", ms(t["dense"]),
              ms(t["scheme"]), ratio(t, "dense", "scheme"), "CCA logits stay fp32")
    return table
