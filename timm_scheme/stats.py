"""Parameter and MAC counts, measured rather than derived from formulas."""
from __future__ import annotations

import copy
import contextlib
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from . import schedule
from .mixers import cca_in_eval, scheme_mixers
from .modes import eval_mode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_mlp_params(model: nn.Module, mlp_names: Sequence[str]) -> int:
    return sum(count_params(model.get_submodule(n)) for n in mlp_names)


def _cpu_fused_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# fused attention kernels FlopCounterMode has no formula for (in torch 2.14: the CPU flash kernel, which timm's
# attention runs on CPU); without them the attention matmuls would go uncounted on CPU only
_ATTENTION_FORMULAS = {op: _cpu_fused_attention for op in (
    getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None),) if op is not None}


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Sequence[int], *, with_cca: bool = False) -> int:
    """Multiply-accumulates of one forward pass on a (1, *input_size) input, per torch's FlopCounterMode
    (matmuls, convolutions and attention, fused kernels included on every device): the eval-mode (deployed)
    function, or with ``with_cca`` the training-time one, every mixer's CCA branch computed as while it is not
    yet annealed out."""
    if with_cca:
        model = copy.deepcopy(model)
        for mixer in scheme_mixers(model).values():
            if mixer.has_cca:  # the cost of a step that runs CCA, whatever the schedule has reached
                mixer.cca_skip_threshold, mixer._fade = 0.0, schedule.FULL
                mixer.cca_fade.fill_(schedule.FULL)
                mixer.update_cca_skip()
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    with eval_mode(model), (cca_in_eval(model) if with_cca else contextlib.nullcontext()), FlopCounterMode(display=False, custom_mapping=_ATTENTION_FORMULAS) as counter:
        model(x)
    return counter.get_total_flops() // 2
