"""Which dense hidden unit goes where: a dense MLP's weights as plain tensors, the places (routes) a unit can take
in a SCHEME mixer, and the exact balanced assignment of units to them by a score (weight energy, or the
calibrated output error of ``calibration``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..layers import SchemeMlp
from ..patching.timm_mlps import read_mlp


@dataclass
class DenseMlpWeights:
    """A dense MLP as plain tensors. Gated MLPs keep both halves of fc1, as SchemeMlp packs them:
    ``first`` and ``second`` (``value * act(gate)`` or ``act(gate) * value``, by ``gate_last``)."""
    fc1_first: torch.Tensor                # (hidden, in)
    fc1_second: Optional[torch.Tensor]     # (hidden, in) for gated MLPs
    bias1_first: Optional[torch.Tensor]
    bias1_second: Optional[torch.Tensor]
    fc2: torch.Tensor                      # (out, hidden)
    bias2: Optional[torch.Tensor]

    @property
    def hidden_features(self) -> int:
        return self.fc2.shape[1]

    def fc1_rows(self) -> torch.Tensor:
        """(hidden, in) or (hidden, 2, in): everything fc1 holds for each hidden unit."""
        if self.fc1_second is None:
            return self.fc1_first
        return torch.stack([self.fc1_first, self.fc1_second], dim=1)


@dataclass(frozen=True)
class Routes:
    """Where a hidden unit can live in a mixer: route r is (fc1 group, fc2 group). Without the channel shuffle
    route k is (k, k) and holds a group's ``per_group`` units; with it route r = i * groups + j is (i, j) and
    holds ``per_group / groups`` units: fc1 group i's chunk j, which fc2 group j reads as its chunk i."""
    groups: int
    per_group: int
    shuffle: bool

    @classmethod
    def of(cls, mixer: SchemeMlp) -> "Routes":
        return cls(mixer.groups, mixer.hidden_features // mixer.groups, mixer.channel_shuffle)

    @property
    def pairs(self) -> List[Tuple[int, int]]:
        g = self.groups
        return [(i, j) for i in range(g) for j in range(g)] if self.shuffle else [(k, k) for k in range(g)]

    @property
    def capacity(self) -> int:
        return self.per_group // self.groups if self.shuffle else self.per_group

    def fc1_slot(self, route: int) -> int:
        """fc1 row (within its group) of the route's first unit; the route's units follow."""
        return (route % self.groups) * self.capacity if self.shuffle else 0

    def fc2_slot(self, route: int) -> int:
        """fc2 column (within its group) of the route's first unit."""
        return (route // self.groups) * self.capacity if self.shuffle else 0


def dense_weights(module: nn.Module, name: str = "") -> DenseMlpWeights:
    """The weights of a timm MLP (``timm_mlps.read_mlp``) as (out, in) matrices."""
    layout = read_mlp(name, module)
    first, second = layout.fc1[0], (layout.fc1[1] if len(layout.fc1) > 1 else None)
    check_convertible(name, [first.weight, module.fc2.weight] + ([second.weight] if second is not None else []))
    w1, b1 = matrix(first.weight), first.bias
    w2, b2 = matrix(module.fc2.weight), module.fc2.bias
    if second is not None:
        return DenseMlpWeights(w1, matrix(second.weight), b1, second.bias, w2, b2)
    if layout.gated:  # one fc1 holding both halves of every unit (GluMlp)
        hidden = w1.shape[0] // 2
        halves_b = (None, None) if b1 is None else (b1[:hidden], b1[hidden:])
        return DenseMlpWeights(w1[:hidden], w1[hidden:], halves_b[0], halves_b[1], w2, b2)
    return DenseMlpWeights(w1, None, b1, None, w2, b2)


def check_convertible(name: str, weights: List[torch.Tensor]) -> None:
    """A clear error for weights there is nothing to convert from (meta device, non-finite)."""
    for t in weights:
        if t.is_meta or not torch.isfinite(t).all():
            raise ValueError(
                f"scheme_patch(init='dense'): layer '{name}' has no weights to convert ("
                f"{'meta-device' if t.is_meta else 'non-finite'} tensor of shape {tuple(t.shape)}); load the "
                "pretrained weights first (timm.create_model(..., pretrained=True)) or use init='random'")


def matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(weight.shape[0], weight.shape[1])  # 1x1 conv (out, in, 1, 1) -> (out, in)


def energy_scores(weights: DenseMlpWeights, groups: int, shuffle: bool = False) -> torch.Tensor:
    """(hidden, routes): share of fc1's squared weights that unit h keeps inside the route's input group and
    of fc2's inside its output group, averaged over the two projections (so the total over a full assignment
    lies in [0, 1]). Routes as in ``Routes``: groups of them, or groups ** 2 with ``shuffle``."""
    rows = weights.fc1_rows().float()
    w2 = weights.fc2.float()
    hidden, c_in, c_out = w2.shape[1], rows.shape[-1], w2.shape[0]
    fc1_in_group = rows.pow(2).reshape(hidden, -1, groups, c_in // groups).sum(dim=(1, 3))
    fc2_in_group = w2.pow(2).reshape(groups, c_out // groups, hidden).sum(dim=1).t()
    fc1_share = fc1_in_group / rows.pow(2).sum().clamp_min(1e-30)
    fc2_share = fc2_in_group / w2.pow(2).sum().clamp_min(1e-30)
    return on_routes(0.5 * (fc1_share[:, :, None] + fc2_share[:, None, :]), shuffle)


def on_routes(per_pair: torch.Tensor, shuffle: bool) -> torch.Tensor:
    """(hidden, input group i, output group j) -> (hidden, routes) in ``Routes`` order: every pair, i * groups + j,
    with the shuffle; the diagonal (k, k) without."""
    return per_pair.flatten(1) if shuffle else per_pair.diagonal(dim1=1, dim2=2)


def assign_units(scores: torch.Tensor, slots: List[int]) -> List[List[int]]:
    """The assignment of hidden units (rows of ``scores``) to groups (or routes) that maximises the total score,
    with exactly ``slots[k]`` units in group k; with fewer slots than units, the lowest-scoring units are left out.
    Exact (a balanced assignment problem solved as a rectangular linear assignment)."""
    hidden, groups = scores.shape
    if len(slots) != groups or sum(slots) > hidden:
        raise ValueError(f"assign_units: slots {slots} do not fit {hidden} units in {groups} groups")
    columns = torch.repeat_interleave(torch.arange(groups), torch.tensor(slots))
    profit = scores.double()[:, columns].cpu().numpy()
    unit_of_row, slot_of_row = linear_sum_assignment(profit, maximize=True)
    units: List[List[int]] = [[] for _ in range(groups)]
    for unit, slot in sorted(zip(unit_of_row.tolist(), slot_of_row.tolist())):
        units[int(columns[slot])].append(unit)
    return units


def diagonal_units(hidden: int, slots: List[int]) -> List[List[int]]:
    """The naive conversion: units in their original order, cut into consecutive groups."""
    units, start = [], 0
    for n in slots:
        units.append(list(range(start, min(start + n, hidden))))
        start += n
    return units


def original_unit_slots(hidden_old: int, hidden_new: int, groups: int) -> List[int]:
    """How many original units each group keeps: all of them, spread evenly, when the new width is at
    least the old one; otherwise hidden_new / groups each."""
    if hidden_new < hidden_old:
        return [hidden_new // groups] * groups
    base, extra = divmod(hidden_old, groups)
    return [base + (k < extra) for k in range(groups)]


def total_score(scores: torch.Tensor, units: List[List[int]]) -> float:
    return float(sum(scores[u, k].sum() for k, u in enumerate(units) if u))
