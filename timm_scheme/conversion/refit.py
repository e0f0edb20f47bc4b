"""The ridge refit of the fc2 blocks: per group, the blocks that best reproduce the dense layer's outputs on
calibration tokens from the new mixer's own hidden activations."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from ..layers import AdaptedSchemeMlp, SchemeMlp
from .units import Routes


class Fc2Refit:
    """Ridge regression, group by group, of the dense layer's output channels on the new mixer's hidden
    activations of the kept units (plus a constant for fc2's bias): the fc2 blocks that best reproduce the
    dense layer on calibration tokens. New units stay silent. ``units`` per route (``LayerInit.units``);
    ``None`` refits every unit."""

    def __init__(self, new: SchemeMlp, units: Optional[List[List[int]]] = None):
        self.new = new
        routes = Routes.of(new)
        if units is None:
            units = [list(range(routes.capacity))] * len(routes.pairs)
        self.columns: List[List[int]] = [[] for _ in range(new.groups)]  # kept columns of each fc2 group
        for route, kept in enumerate(units):
            start = routes.fc2_slot(route)
            self.columns[routes.pairs[route][1]] += range(start, start + sum(u >= 0 for u in kept))
        self.slots = [[k * routes.per_group + c for c in cols] for k, cols in enumerate(self.columns)]
        self.with_bias = new.fc2.bias is not None
        out_size = new.fc2.out_features // new.groups
        sizes = [len(s) + self.with_bias for s in self.slots]
        self.gram = [torch.zeros(n, n, dtype=torch.float64) for n in sizes]
        self.cross = [torch.zeros(n, out_size, dtype=torch.float64) for n in sizes]

    @staticmethod
    def supports(new: SchemeMlp) -> bool:
        """Per-token hidden activations can be recomputed unless a norm pools over space (GroupNorm) or the mixer
        runs a family's own forward (read through an adapter)."""
        return not isinstance(new, AdaptedSchemeMlp) and not isinstance(new.norm, nn.GroupNorm)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        hidden = mixer_hidden(self.new, x.to(self.new.fc1.weight.dtype)).double().cpu()
        y = y.double().cpu()
        out_size = y.shape[1] // self.new.groups
        for k, slots in enumerate(self.slots):
            features = hidden[:, slots]
            if self.with_bias:
                features = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], 1)
            self.gram[k] += features.t() @ features
            self.cross[k] += features.t() @ y[:, k * out_size:(k + 1) * out_size]

    @torch.no_grad()
    def solve(self) -> None:
        fc2 = self.new.fc2
        out_size = fc2.out_features // self.new.groups
        for k, columns in enumerate(self.columns):
            gram = self.gram[k]
            ridge = 1e-3 * gram.diagonal().mean().clamp_min(1e-12)  # keeps rarely active units' weights bounded
            solution = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), self.cross[k])
            fc2.weight[k, :, columns] = solution[:len(columns)].t().to(fc2.weight)
            if self.with_bias:
                fc2.bias[k * out_size:(k + 1) * out_size] = solution[-1].to(fc2.bias)


def mixer_hidden(mixer: SchemeMlp, x: torch.Tensor) -> torch.Tensor:
    """A SchemeMlp's hidden activations as fc2 reads them, for (tokens, in_features): ``SchemeMlp.fc2_input``
    on tokens, as 1x1 maps for an NCHW mixer."""
    if mixer.use_conv:
        return mixer.fc2_input(x[:, :, None, None]).flatten(1)
    return mixer.fc2_input(x)
