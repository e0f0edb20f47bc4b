"""Section ``train``: a training step (forward, backward, AdamW) with CCA against dense, saved activations, and
peak RSS measured in a fresh process per model."""
from __future__ import annotations

import gc
import math
import multiprocessing as mp
import os
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..harness import Settings, Table, compare, ms, ratio
from .common import Plan
from .models import MODEL_LABELS, dense_model, scheme_model


def train_step(model: nn.Module, batch: int, img: int = 224) -> Callable[[], None]:
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
    step = train_step(model, batch)
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
    steps = {k: train_step(m, b) for k, m in models.items()}
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
