"""Data-parallel training of SCHEME models under torchrun: the process group, the DDP replica, and the
check that every rank mixes and skips CCA alike. A single process (no torchrun) needs none of it."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..mixers import scheme_mixers


@dataclass(frozen=True)
class Processes:
    """Where this process trains: alone (the default), or as one rank of a torchrun launch."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rank_seed(self, seed: int) -> int:
        """A seed of its own per rank; the single-process seed unchanged."""
        return seed * self.world_size + self.rank

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks (every rank must call it)."""
        if not self.distributed:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total) / self.world_size


def start_processes() -> Processes:
    """Alone unless torchrun set WORLD_SIZE > 1; then join its process group: nccl with one GPU per process
    when CUDA is available, gloo on CPU otherwise. torchrun's environment says where to meet (env://)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), device)


def end_processes(processes: Processes, wait: bool = False) -> None:
    """Leave the process group (once; `wait` for every rank to get here first)."""
    if processes.distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def replicate(model: nn.Module, processes: Processes) -> nn.Module:
    """The model to train: itself alone, a DDP replica under torchrun."""
    if not processes.distributed:
        return model
    # no find_unused_parameters (an extra graph walk per step): every parameter gets a gradient in every
    # step, mix_logits included while a layer skips its CCA branch, since alpha still scales the BD-MLP.
    # DDP broadcasts rank 0's buffers, the CCA limit among them, before each forward.
    device_ids = [processes.device] if processes.device.type != "cpu" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def check_ranks_agree(model: nn.Module, processes: Processes) -> None:
    """Every rank must mix with the same weights and skip the same CCA branches. DDP keeps the mixing logits
    equal and the annealing limit follows the shared step count, so a difference means the replicas
    drifted apart and would go on training different functions without any error."""
    mixers = {name: m for name, m in scheme_mixers(model).items() if m.has_cca}
    if not processes.distributed or not mixers:
        return
    state = torch.stack([
        torch.cat([m.mix_logits.detach().double(), m.cca_limit.detach().double().reshape(1),
                   m.cca_fade.detach().double().reshape(1),
                   torch.tensor([float(m.update_cca_skip())], dtype=torch.float64, device=m.cca_limit.device)])
        for m in mixers.values()])
    low, high = state.clone(), state.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differing = [name for name, lo, hi in zip(mixers, low, high) if not torch.equal(lo, hi)]
    if differing:
        raise RuntimeError(
            f"ranks disagree on the mixing logits, CCA limit or schedule, or CCA skip decision of {len(differing)} SCHEME "
            f"layer(s): {', '.join(differing[:4])}. DDP keeps them equal when every rank runs the same code, "
            "torch build and arguments; check the launch (torchrun ... timm-scheme train with identical options).")
