"""The one training loop of the commands and examples, and evaluation."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.utils import accuracy
from torch import nn
from tqdm.auto import tqdm

from ..mixers import cca_weights
from ..modes import eval_mode

Batches = Iterable[Tuple[torch.Tensor, torch.Tensor]]


def train_one_epoch(
        model: nn.Module,
        batches: Batches,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        scheduler=None,
        first_update: int = 0,
        clip_grad: Optional[float] = None,
        mixup: Optional[Callable] = None,
        batch_augment: Optional[Callable] = None,
        forward: Optional[Callable[[torch.Tensor], object]] = None,
        progress: bool = False,
        desc: str = "training",
        device: torch.device = torch.device("cpu"),
        total: Optional[int] = None,
) -> float:
    """One pass over ``batches``: a step per batch, the scheduler stepped per update (timm's ``step_update`` or a
    torch scheduler's ``step``). ``forward`` replaces ``model(x)`` (e.g. a Distiller, whose output ``loss_fn``
    then takes). A SCHEME model anneals CCA by its own schedule: nothing here touches it. Returns the mean loss."""
    model.train()
    losses = []
    forward = forward or model
    bar = tqdm(batches, desc=desc, total=total, leave=False, disable=not progress, dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        if batch_augment is not None:
            x = batch_augment(x)
        if mixup is not None:
            x, y = mixup(x, y)
        x, y = x.to(device), y.to(device)  # augmented where the data lives (RandomErasing is set up on CPU)
        loss = loss_fn(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        if scheduler is not None:
            if hasattr(scheduler, "step_update"):
                scheduler.step_update(num_updates=first_update + i + 1)
            else:
                scheduler.step()
        losses.append(loss.item())
        weights = list(cca_weights(model).values())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", cca=f"{sum(weights) / len(weights) if weights else 0.0:.3f}")
    return sum(losses) / len(losses) if losses else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, *, across_processes: bool = False) -> Tuple[float, float]:
    """(cross-entropy, top-1 %) of the model in eval mode, on the device of its parameters.
    ``across_processes``: the batches are this rank's shard; the totals are summed over all ranks."""
    device = next(model.parameters()).device
    total, correct, loss_sum = 0, 0.0, 0.0
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += float(accuracy(logits, y, topk=(1,))[0]) * len(y) / 100.0
            total += len(y)
    if across_processes:
        sums = torch.tensor([loss_sum, correct, total], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        loss_sum, correct, total = float(sums[0]), float(sums[1]), int(sums[2])
    return loss_sum / max(total, 1), 100.0 * round(correct) / max(total, 1)


def short_schedule(model: nn.Module, lr: float, steps: int):
    """(optimizer, scheduler) of the short runs (demo, examples): timm's AdamW, 10% linear warm-up, then a cosine
    to 0 (which, under the default CCA schedule, also fades CCA out)."""
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return optimizer, scheduler


def random_batches(x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int, seed: int) -> Batches:
    """``steps`` batches drawn with replacement from in-memory data, reproducibly from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(y), (batch_size,), generator=generator)
        yield x[idx], y[idx]
