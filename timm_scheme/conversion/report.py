"""What a conversion kept: the per-layer record of ``init="dense"`` and each layer's output error against its
dense original."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from torch import nn

from ..mixers import scheme_mixers
from ..modes import eval_mode
from .calibration import relative_output_error


@dataclass
class LayerInit:
    """How one layer was started: which original hidden unit fills each slot of each route (see ``Routes``;
    without the channel shuffle, of each group; -1 = a new, silent unit) and the share of the pretrained weight
    energy the blocks keep, against the naive "diagonal blocks in the original order" conversion."""
    units: List[List[int]]
    retained_energy: float
    diagonal_energy: float
    objective: str
    refit: bool = False  # fc2 blocks refit to the dense outputs on calibration images


@dataclass
class InitReport:
    """Per-layer record of ``init="dense"``, kept on ``model.scheme_init_report``."""
    layers: Dict[str, LayerInit] = field(default_factory=dict)

    def summary(self) -> str:
        if not self.layers:
            return "no layers converted"
        kept = [v.retained_energy for v in self.layers.values()]
        naive = [v.diagonal_energy for v in self.layers.values()]
        return (f"{len(kept)} layers; weight energy kept in the blocks: {sum(kept) / len(kept):.3f} "
                f"(diagonal blocks in the original order: {sum(naive) / len(naive):.3f})")


@torch.no_grad()
def layer_output_errors(dense: nn.Module, patched: nn.Module, images: torch.Tensor) -> Dict[str, float]:
    """Per layer, ||dense MLP(x) - SCHEME mixer(x)|| / ||dense MLP(x)|| in eval mode, with x the inputs the
    dense model feeds that layer: what each conversion loses, layer by layer, before any training."""
    mixers = scheme_mixers(patched)
    captured: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    modules = dict(dense.named_modules())
    hooks = [modules[name].register_forward_hook(
        lambda mod, args, out, name=name: captured.__setitem__(name, (args[0], out))) for name in mixers]
    try:
        with eval_mode(dense, patched):
            dense(images)
            return {name: relative_output_error(captured[name][1], mixer(captured[name][0]))
                    for name, mixer in mixers.items()}
    finally:
        for h in hooks:
            h.remove()
