"""Start a SCHEME mixer from a pretrained dense MLP (``scheme_patch(..., init="dense")``).

A dense MLP's hidden units may be permuted freely (rows of fc1 with the matching columns of fc2). Each
unit is assigned to one group, balanced across groups, so that the most of the pretrained function falls
inside the diagonal blocks; the kept blocks are copied. Units beyond the original width start silent
(their fc2 columns zero); with fewer units the least useful ones are dropped by the same assignment.
With the channel shuffle a unit's place is a route, (fc1 group i, fc2 group j): it reads input group i and
writes output group j, so units whose weights cross groups keep more of them.

Knows dense timm MLPs and SchemeMlp; nothing about files.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from .layers import AdaptedSchemeMlp, SchemeMlp
from .mixers import scheme_mixers
from .modes import eval_mode
from .timm_mlps import read_mlp

_logger = logging.getLogger(__name__)
CalibrationData = Union[torch.Tensor, Iterable]
_TOKEN_CHUNK = 4096  # tokens per calibration pass: keeps the (tokens, hidden) scratch small on big models


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


# --- which unit goes where -----------------------------------------------------------------------------

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
    return _on_routes(0.5 * (fc1_share[:, :, None] + fc2_share[:, None, :]), shuffle)


def _on_routes(per_pair: torch.Tensor, shuffle: bool) -> torch.Tensor:
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


# --- calibration: the layer's output error on real activations ---------------------------------------

class OutputErrorStats:
    """Per (unit, group) statistics of one layer's hidden activations on calibration tokens, from which
    ``scores()`` gives minus the error each unit adds to the layer output when cut to one group's block."""

    def __init__(self, mlp: nn.Module, weights: DenseMlpWeights, groups: int):
        self.layout, self.weights, self.groups = read_mlp("", mlp), weights, groups
        hidden = weights.hidden_features
        self.full_sq = torch.zeros(hidden, dtype=torch.float64)
        self.cross = torch.zeros(hidden, groups, dtype=torch.float64)
        self.block_sq = torch.zeros(hidden, groups, dtype=torch.float64)
        self.tokens = 0

    @torch.no_grad()
    def add(self, tokens: torch.Tensor) -> None:
        """Add (tokens, in_features) inputs of the layer."""
        for chunk in tokens.float().split(_TOKEN_CHUNK):
            self._add_chunk(chunk)

    def _add_chunk(self, x: torch.Tensor) -> None:
        c_in = x.shape[1]
        full = self._hidden(x, slice(None))
        self.full_sq += full.double().pow(2).sum(0).cpu()
        size = c_in // self.groups
        for k in range(self.groups):
            part = self._hidden(x, slice(k * size, (k + 1) * size))
            self.cross[:, k] += (full * part).double().sum(0).cpu()
            self.block_sq[:, k] += part.double().pow(2).sum(0).cpu()
        self.tokens += x.shape[0]

    def _hidden(self, x: torch.Tensor, cols: slice) -> torch.Tensor:
        """Hidden activations using only input channels ``cols`` (all of fc1's biases)."""
        w = self.weights
        first = F.linear(x[:, cols], w.fc1_first[:, cols].float(), _float(w.bias1_first))
        layout = self.layout
        if w.fc1_second is None:
            if layout.norm_first:  # a per-unit norm (ConvMlp's BatchNorm) before the activation
                first = layout.norm(first[:, :, None, None].to(w.fc1_first.dtype)).float().flatten(1)
            return layout.act(first.to(w.fc1_first.dtype)).float()
        second = F.linear(x[:, cols], w.fc1_second[:, cols].float(), _float(w.bias1_second))
        act = layout.act
        if layout.gate_last:
            return first * act(second.to(w.fc1_first.dtype)).float()
        return act(first.to(w.fc1_first.dtype)).float() * second

    def scores(self, shuffle: bool = False) -> torch.Tensor:
        """(hidden, routes): minus the mean squared output error of unit h kept on one route only (reading
        input group i, writing output group j; i = j without ``shuffle``, see ``Routes``)."""
        if not self.tokens:
            raise ValueError("calibration_data reached no token of this layer")
        w2 = self.weights.fc2.double().cpu().pow(2)
        full_norm = w2.sum(0)                                           # ||fc2[:, h]||^2
        block_norm = w2.reshape(self.groups, -1, w2.shape[1]).sum(1).t()  # ||fc2[O_j, h]||^2
        kept = 2 * self.cross - self.block_sq                           # per input group i
        error = (full_norm * self.full_sq)[:, None, None] - kept[:, :, None] * block_norm[:, None, :]
        return -(_on_routes(error, shuffle) / self.tokens).float()


def _float(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float()


def calibration_batches(data: CalibrationData) -> List[torch.Tensor]:
    """The calibration images as a list of batches (read once: the conversion passes over them twice)."""
    if isinstance(data, torch.Tensor):
        return [data]
    try:
        iterator = iter(data)
    except TypeError:
        raise ValueError(
            f"calibration_data: expected a tensor of images or an iterable of batches (tensors or "
            f"(images, targets) pairs), got {type(data).__name__}") from None
    batches = []
    for batch in iterator:
        if isinstance(batch, (tuple, list)) and batch:
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            raise ValueError(f"calibration_data: a batch is a {type(batch).__name__}, expected a tensor of images")
        batches.append(batch)
    if not batches:
        raise ValueError("calibration_data holds no batch; pass a few hundred images or leave it out")
    return batches


@torch.no_grad()
def run_dense_layers(model: nn.Module, layers: Dict[str, nn.Module], batches: List[torch.Tensor],
                     consume: Callable[[str, torch.Tensor, torch.Tensor], None]) -> None:
    """Run the (still dense) model in eval mode on every batch, handing each layer's (input, output) tokens,
    channels last, to ``consume(name, x, y)``."""
    def hook(module, args, output, name):
        channel_dim = 1 if _is_conv(module) else args[0].dim() - 1
        consume(name, _tokens(args[0], channel_dim), _tokens(output, channel_dim))

    hooks = [m.register_forward_hook(functools.partial(hook, name=name)) for name, m in layers.items()]
    seen = set()
    counter = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.add(name)) for name, m in layers.items()]
    device = next(model.parameters()).device
    try:
        with eval_mode(model):
            for i, batch in enumerate(batches):
                try:
                    model(batch.to(device))
                except Exception as error:  # noqa: BLE001 - re-raised with what the user passed
                    raise ValueError(
                        f"scheme_patch(init='dense'): calibration batch {i} of shape {tuple(batch.shape)} does not "
                        f"run through {type(model).__name__}: {error}") from error
    finally:
        for h in hooks + counter:
            h.remove()
    missing = sorted(set(layers) - seen)
    if missing:
        raise ValueError(f"scheme_patch(init='dense'): calibration_data never reached layer(s) {missing[:3]}")


class _Reached(Exception):
    """Stops a forward pass once the layer of interest has run."""


def layer_io_tokens(model: nn.Module, name: str, batch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Layer ``name``'s input and output on ``batch`` as (tokens, channels), the model run only that far."""
    module = model.get_submodule(name)
    captured = []

    def hook(mod, args, output):
        channel_dim = 1 if _is_conv(mod) else args[0].dim() - 1
        captured.append((_tokens(args[0], channel_dim), _tokens(output, channel_dim)))
        raise _Reached

    handle = module.register_forward_hook(hook)
    try:
        model(batch.to(next(model.parameters()).device))
    except _Reached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"calibration: a batch of shape {tuple(batch.shape)} never reached layer {name}")
    return captured[0]


def _is_conv(mlp: nn.Module) -> bool:
    return mlp.use_conv if isinstance(mlp, SchemeMlp) else read_mlp("", mlp).use_conv


def _tokens(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim]).float()


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


# --- copying the kept blocks ---------------------------------------------------------------------------

@torch.no_grad()
def load_dense_blocks(new: SchemeMlp, old: nn.Module, weights: DenseMlpWeights, units: List[List[int]]) -> None:
    """Fill ``new`` with the blocks of the dense weights that ``units`` (per route) keeps; other slots stay as
    built (random fc1 rows) and are silenced by zeroing their fc2 columns."""
    routes = Routes.of(new)
    groups, c_in, c_out = new.groups, new.fc1.in_features, new.fc2.out_features
    per_group = routes.per_group
    in_size, out_size = c_in // groups, c_out // groups
    fc1 = new.fc1.weight.view(groups, -1, per_group, in_size)  # (g, 1 or 2 halves, units, in/g)
    fc1_bias = None if new.fc1.bias is None else new.fc1.bias.view(groups, -1, per_group)
    fc2 = new.fc2.weight                                        # (g, out/g, units)
    halves = [(weights.fc1_first, weights.bias1_first)]
    if weights.fc1_second is not None:
        halves.append((weights.fc1_second, weights.bias1_second))
    fc2.zero_()
    for route, kept in enumerate(units):
        i, j = routes.pairs[route]
        index = torch.tensor(kept, dtype=torch.long, device=weights.fc2.device)
        n, cols, outs = len(kept), slice(i * in_size, (i + 1) * in_size), slice(j * out_size, (j + 1) * out_size)
        rows, columns = slice(routes.fc1_slot(route), routes.fc1_slot(route) + n), \
            slice(routes.fc2_slot(route), routes.fc2_slot(route) + n)
        for half, (w1, b1) in enumerate(halves):
            fc1[i, half, rows] = w1[index][:, cols].to(fc1.dtype)
            if fc1_bias is not None:
                fc1_bias[i, half, rows] = b1[index].to(fc1_bias.dtype) if b1 is not None else 0
        fc2[j, :, columns] = weights.fc2[outs][:, index].to(fc2.dtype)
    if new.fc2.bias is not None and weights.bias2 is not None:
        new.fc2.bias.copy_(weights.bias2)
    _load_hidden_norm(new, old, units, routes)


@torch.no_grad()
def undo_alpha(new: SchemeMlp) -> None:
    """Scale fc2 by 1 / alpha, so the eval-mode output (alpha * BD-MLP) is the converted MLP itself."""
    if new.has_cca:
        alpha = new.mixing_weights()[0]
        for t in (new.fc2.weight, new.fc2.bias):
            if t is not None:
                t.copy_((t.float() / alpha).to(t.dtype))


def _load_hidden_norm(new: SchemeMlp, old: nn.Module, units: List[List[int]], routes: Routes) -> None:
    """Per-unit parameters and statistics of a hidden norm (before the shuffle) follow their units; new units
    keep fresh ones."""
    if isinstance(old.norm, nn.Identity):
        return
    slots = [routes.pairs[r][0] * routes.per_group + routes.fc1_slot(r) + t
             for r, kept in enumerate(units) for t in range(len(kept))]
    sources = [u for kept in units for u in kept]
    for attr in ("weight", "bias", "running_mean", "running_var"):
        src, dst = getattr(old.norm, attr, None), getattr(new.norm, attr, None)
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.dim() == 1:
            dst[slots] = src[sources].to(dst.dtype)


def hidden_norm_is_exact(old: nn.Module, hidden_new: int, hidden_old: int) -> bool:
    """A norm over all hidden units (LayerNorm, GroupNorm) sees new statistics when the width changes."""
    per_unit = isinstance(old.norm, (nn.Identity, nn.modules.batchnorm._BatchNorm))
    return per_unit or hidden_new == hidden_old


def relative_output_error(reference: torch.Tensor, output: torch.Tensor) -> float:
    """||reference - output|| / ||reference||, in float64."""
    ref = reference.double()
    return float((ref - output.double()).norm() / ref.norm().clamp_min(1e-30))


# --- the whole conversion --------------------------------------------------------------------------------

def init_from_dense(model: nn.Module, layers: List[Tuple[str, nn.Module, SchemeMlp]], groups: int,
                    calibration_data: Optional[CalibrationData] = None, *, assignment: str = "best") -> InitReport:
    """Start each new mixer from its dense original: ``layers`` holds (name, dense MLP, new SchemeMlp).

    Without calibration data the assignment keeps the most weight energy and the eval-mode mixer computes
    the block-diagonal projection of the dense MLP. With ``calibration_data`` (``model`` must still hold the
    dense MLPs) the assignment minimises each layer's output error on those images, and the fc2 blocks of
    the kept units are then refit (ridge regression) to the dense layer's outputs.
    ``assignment="diagonal"`` gives the naive baseline instead (units in their original order).
    """
    if assignment not in ("best", "diagonal"):
        raise ValueError(f"assignment={assignment!r}: expected 'best' or 'diagonal'")
    weights = {name: dense_weights(old, name) for name, old, _ in layers}
    batches = None if calibration_data is None else calibration_batches(calibration_data)
    originals = {name: old for name, old, _ in layers}
    stats = None
    if batches is not None and assignment == "best":
        stats = {name: OutputErrorStats(old, weights[name], groups) for name, old, _ in layers}
        run_dense_layers(model, originals, batches, lambda name, x, y: stats[name].add(x))
    report, approximate = InitReport(), []
    for name, old, new in layers:
        w = weights[name]
        routes = Routes.of(new)
        energy = energy_scores(w, groups, routes.shuffle)
        slots = original_unit_slots(w.hidden_features, new.hidden_features, len(routes.pairs))
        diagonal = diagonal_units(w.hidden_features, slots)
        units = diagonal if assignment == "diagonal" else assign_units(
            energy if stats is None else stats[name].scores(routes.shuffle), slots)
        load_dense_blocks(new, old, w, units)
        if not hidden_norm_is_exact(old, new.hidden_features, w.hidden_features):
            approximate.append(name)
        report.layers[name] = LayerInit(
            units=[kept + [-1] * (routes.capacity - len(kept)) for kept in units],
            retained_energy=total_score(energy, units), diagonal_energy=total_score(energy, diagonal),
            objective=assignment if assignment == "diagonal" else "energy" if stats is None else "output_error")
    if batches is not None:
        _refit_fc2(model, layers, report, batches)
    for _, _, new in layers:
        undo_alpha(new)
    if approximate and batches is None:
        _logger.warning(
            "SCHEME init='dense': these layers normalise over all hidden units and change width, so they start "
            "close to, not exactly at, the block-diagonal projection: %s", approximate)
    return report


def _refit_fc2(model: nn.Module, layers: List[Tuple[str, nn.Module, SchemeMlp]], report: InitReport,
               batches: List[torch.Tensor]) -> None:
    refits = {name: Fc2Refit(new, report.layers[name].units) for name, _, new in layers if Fc2Refit.supports(new)}
    originals = {name: old for name, old, _ in layers if name in refits}
    with eval_mode(*(new for _, _, new in layers)):  # hidden norms use their running statistics, as the dense layer did
        run_dense_layers(model, originals, batches, lambda name, x, y: refits[name].add(x, y))
    for name, refit in refits.items():
        refit.solve()
        report.layers[name].refit = True
    skipped = sorted(set(report.layers) - set(refits))
    if skipped:
        _logger.warning("SCHEME init='dense': fc2 not refit where a hidden norm pools over space: %s", skipped)


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


__all__ = [
    "DenseMlpWeights", "Fc2Refit", "InitReport", "LayerInit", "OutputErrorStats", "Routes", "assign_units",
    "calibration_batches", "dense_weights", "diagonal_units", "energy_scores", "init_from_dense",
    "layer_output_errors", "load_dense_blocks", "mixer_hidden", "original_unit_slots", "relative_output_error",
    "run_dense_layers", "total_score", "undo_alpha",
]
