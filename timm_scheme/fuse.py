"""Inference fusion of a SCHEME model: what it discards, an optional refit that keeps what it can of it, and
the check that the fused model computes what it should.

Fusing drops ``(1 - alpha) * CCA(x)`` per layer and folds ``alpha`` into ``fc2``; it is exact for the
eval-mode function (an unfused model in ``eval()`` already computes ``alpha * BD_MLP(x)``). A model trained
without annealing still relies on CCA; given calibration images, fusing instead refits each layer's fc2 blocks
to that layer's training-time output (CCA applied), which brings the fused model closer to the function that
was trained than the exact fold does.
"""
from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .conversion import CalibrationData, Fc2Refit, calibration_batches, layer_io_tokens, relative_output_error
from .layers import SchemeMlp
from .mixers import cca_in_eval, scheme_mixers
from .modes import eval_mode

_logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-5  # max |fused - unfused| / max |unfused|, fp32


class FuseVerificationError(RuntimeError):
    """The fused model does not compute the unfused model's eval-mode function on the example inputs."""


@dataclass
class FuseReport:
    """What ``fuse_for_inference`` did and discarded, and how the fused model compares."""
    cca_weights: Dict[str, float] = field(default_factory=dict)  # per fused layer, the 1 - alpha it discarded
    above_threshold: List[str] = field(default_factory=list)
    threshold: float = 0.0
    # ||f_train_nodrop - f_fused|| / ||f_train_nodrop|| on the example inputs: what fusing changed of the
    # function that was trained
    relative_output_change: Optional[float] = None
    # max |f_fused - f_eval| / max |f_eval| on the example inputs (exact fusing only: a refit changes it on purpose)
    eval_difference: Optional[float] = None
    tolerance: float = DEFAULT_TOLERANCE
    calibrated: List[str] = field(default_factory=list)  # layers whose fc2 was refit to the training function
    leftover_tensors: List[str] = field(default_factory=list)  # training-time tensors still in the state dict
    nothing_to_fuse: Optional[str] = None  # why no layer was fused

    @property
    def verified(self) -> bool:
        exact = self.eval_difference is None or self.eval_difference <= self.tolerance
        return exact and not self.leftover_tensors

    def summary(self) -> str:
        if self.nothing_to_fuse:
            return f"nothing to fuse: {self.nothing_to_fuse}"
        worst = max(self.cca_weights.values())
        text = f"fused {len(self.cca_weights)} SCHEME mixers; largest discarded CCA weight {worst:.3g}"
        if self.calibrated:
            text += f"; fc2 refit to the training function in {len(self.calibrated)} layers"
        if self.relative_output_change is not None:
            text += f"; relative output change on the given batch {self.relative_output_change:.3g}"
        if self.eval_difference is not None:
            text += f"; max relative difference to the unfused eval output {self.eval_difference:.2e}"
        return text


def max_relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |other - reference| / max |reference|: how a fused or exported model is checked against the model."""
    return float((other - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def fuse_for_inference(
        model: nn.Module,
        example_inputs: Optional[Any] = None,
        *,
        warn_threshold: Optional[float] = None,
        calibration_data: Optional[CalibrationData] = None,
        tolerance: float = DEFAULT_TOLERANCE,
) -> nn.Module:
    """Fuse every SCHEME mixer in place (CCA removed, alpha folded into fc2); returns the model.

    The report (:class:`FuseReport`) is logged and kept as ``model.scheme_fuse_report``. A layer whose CCA
    weight exceeds ``warn_threshold`` (default: the config's ``fuse_warn_threshold``) is warned about.

    Given ``example_inputs`` (a tensor, or a tuple of positional inputs), the fused model is checked against
    the unfused eval-mode output (``max |fused - unfused| / max |unfused| <= tolerance``, else
    :class:`FuseVerificationError`), and the report holds the relative change against the training-time function.
    Given ``calibration_data`` (images, or batches of them), each layer's fc2 blocks are instead refit, layer by
    layer, so that the fused layer reproduces its training-time output (CCA applied) on the inputs the fused
    model gives it: for models trained without annealing, whose CCA weight is still large.
    Fusing a fused model does nothing.
    """
    mixers = scheme_mixers(model)
    config = getattr(model, "scheme_config", None)
    if not mixers and config is None:
        raise ValueError(
            f"fuse_for_inference: {type(model).__name__} has no SCHEME mixers; "
            "call timm_scheme.scheme_patch(model, ...) first")
    if tolerance < 0:
        raise ValueError(f"fuse_for_inference: tolerance={tolerance} must be >= 0")
    to_fuse = {name: m for name, m in mixers.items() if m.has_cca}
    if warn_threshold is None:
        warn_threshold = config.fuse_warn_threshold if config is not None else 0.01
    report = FuseReport(threshold=warn_threshold, tolerance=tolerance)
    if not to_fuse:
        report.nothing_to_fuse = ("the mixers were built without CCA (cca=False), so there is no training-time "
                                  "branch to remove" if config is not None and not config.cca else "already fused")
        model.scheme_fuse_report = report
        _logger.info("fuse_for_inference: %s", report.summary())
        return model

    report.cca_weights = {name: m.cca_weight() for name, m in to_fuse.items()}
    report.above_threshold = [n for n, w in report.cca_weights.items() if w > warn_threshold]
    trained = unfused = None
    if example_inputs is not None:
        with eval_mode(model), torch.no_grad():
            with cca_in_eval(model):
                trained = _run(model, example_inputs)
            unfused = _run(model, example_inputs)

    if calibration_data is not None:
        report.calibrated = _fuse_calibrated(model, to_fuse, calibration_batches(calibration_data))
    for m in to_fuse.values():
        m.fuse()  # what the refit left (layers it cannot refit)

    report.leftover_tensors = [k for k in model.state_dict() if k.rpartition(".")[2] in SchemeMlp.TRAINING_STATE]
    if example_inputs is not None:
        with eval_mode(model), torch.no_grad():
            fused = _run(model, example_inputs)
        report.relative_output_change = _relative_change(trained, fused)
        if not report.calibrated:
            report.eval_difference = max(max_relative_difference(a, b) for a, b in zip(unfused, fused))
    model.scheme_fuse_report = report
    _logger.info("fuse_for_inference: %s", report.summary())
    if not report.verified:
        raise FuseVerificationError(
            f"fuse_for_inference: the fused model differs from the unfused eval-mode model by "
            f"{report.eval_difference:.2e} (> tolerance {tolerance:g}) or keeps training-time tensors "
            f"{report.leftover_tensors[:4]}; do not deploy it. Report this with the model and inputs")
    if report.above_threshold:
        _warn_discarded(report)
    return model


def _warn_discarded(report: FuseReport) -> None:
    shown = ", ".join(f"{n} ({report.cca_weights[n]:.3g})" for n in report.above_threshold[:8])
    more = len(report.above_threshold) - 8
    layers = f"{len(report.above_threshold)} layer(s) discarded a CCA weight above {report.threshold}: " \
             f"{shown}{f' and {more} more' if more > 0 else ''}."
    if report.calibrated:
        change = (f" (relative output change against the training-time function on the example batch "
                  f"{report.relative_output_change:.3g})" if report.relative_output_change is not None else "")
        warnings.warn(f"fuse_for_inference: {layers} fc2 was refit to the training-time function on the "
                      f"calibration images{change}.", stacklevel=3)
        return
    warnings.warn(
        f"fuse_for_inference: {layers} The fused model equals the eval-mode model, but differs from the "
        "training-time function there; anneal CCA out during training (SchemeConfig.cca_anneal: 'lr' with a "
        "decaying learning rate, or 'steps' with cca_anneal_steps), or pass calibration_data to refit fc2 to the "
        "training-time function.", stacklevel=3)


def _fuse_calibrated(model: nn.Module, to_fuse: Dict[str, SchemeMlp], batches: List[torch.Tensor]) -> List[str]:
    """Layer by layer, in module order: fc2 refit (ridge regression per group) so that the fused layer, fed what
    the already-fused layers before it give it, reproduces the training-time model's output of that layer."""
    trained = copy.deepcopy(model)  # the reference: every layer unfused, CCA applied
    refit = []
    with eval_mode(model, trained), cca_in_eval(trained), torch.no_grad():
        for name, mixer in to_fuse.items():
            if not Fc2Refit.supports(mixer):
                _logger.warning("fuse_for_inference: %s is not refit (a hidden norm that pools over space, or a "
                                "family's own MLP read through an adapter); fused as is", name)
                continue
            solver = Fc2Refit(mixer)
            for batch in batches:
                x, _ = layer_io_tokens(model, name, batch)
                _, y = layer_io_tokens(trained, name, batch)
                solver.add(x, y)
            mixer.fuse()
            solver.solve()
            refit.append(name)
    return refit


def _run(model: nn.Module, example_inputs: Any) -> List[torch.Tensor]:
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return [t.float() for t in _tensors(model(*args))]


def _tensors(output: Any) -> List[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


def _relative_change(reference: List[torch.Tensor], fused: List[torch.Tensor]) -> float:
    return relative_output_error(torch.cat([t.flatten() for t in reference]), torch.cat([t.flatten() for t in fused]))
