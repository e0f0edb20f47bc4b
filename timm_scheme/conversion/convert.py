"""Start a SCHEME mixer from a pretrained dense MLP (``scheme_patch(..., init="dense")``).

A dense MLP's hidden units may be permuted freely (rows of fc1 with the matching columns of fc2). Each
unit is assigned to one group, balanced across groups, so that the most of the pretrained function falls
inside the diagonal blocks; the kept blocks are copied. Units beyond the original width start silent
(their fc2 columns zero); with fewer units the least useful ones are dropped by the same assignment.
With the channel shuffle a unit's place is a route, (fc1 group i, fc2 group j): it reads input group i and
writes output group j, so units whose weights cross groups keep more of them.

This module runs the whole conversion; the steps live beside it: ``units`` (which unit goes where),
``calibration`` (the calibration images and each layer's tokens), ``refit`` (fc2 refit on them), ``blocks``
(copying the kept blocks) and ``report`` (what was kept). Knows dense timm MLPs and SchemeMlp; nothing about files.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..layers import SchemeMlp
from ..modes import eval_mode
from .blocks import hidden_norm_is_exact, load_dense_blocks, undo_alpha
from .calibration import CalibrationData, OutputErrorStats, calibration_batches, run_dense_layers
from .refit import Fc2Refit
from .report import InitReport, LayerInit
from .units import Routes, assign_units, dense_weights, diagonal_units, energy_scores, original_unit_slots, total_score

_logger = logging.getLogger(__name__)


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
