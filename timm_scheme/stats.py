"""Parameter and MAC counts, measured rather than derived from formulas."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_mlp_params(model: nn.Module, mlp_names: Sequence[str]) -> int:
    return sum(count_params(model.get_submodule(n)) for n in mlp_names)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-accumulates of one eval-mode forward pass on a (1, *input_size) input, per torch's
    FlopCounterMode (matmuls and convolutions)."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
