"""Inference fusion of a SCHEME model, and what it discards.

Fusing drops ``(1 - alpha) * CCA(x)`` per layer and folds ``alpha`` into ``fc2``; it is exact for the
eval-mode function (an unfused model in ``eval()`` already computes ``alpha * BD_MLP(x)``).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn

from .layers import SchemeMlp
from .schedule import cca_anneal_limit  # noqa: F401  (re-exported)

_logger = logging.getLogger(__name__)


@dataclass
class FuseReport:
    """What ``fuse_for_inference`` discarded."""
    cca_weights: Dict[str, float] = field(default_factory=dict)  # per fused layer, 1 - alpha
    above_threshold: List[str] = field(default_factory=list)
    threshold: float = 0.0
    relative_output_change: Optional[float] = None  # ||f_train_nodrop - f_fused|| / ||f_train_nodrop||

    def summary(self) -> str:
        if not self.cca_weights:
            return "nothing to fuse"
        worst = max(self.cca_weights.values())
        text = f"fused {len(self.cca_weights)} SCHEME mixers; largest discarded CCA weight {worst:.3g}"
        if self.relative_output_change is not None:
            text += f"; relative output change on the given batch {self.relative_output_change:.3g}"
        return text


def scheme_mixers(model: nn.Module) -> Dict[str, SchemeMlp]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SchemeMlp)}


def cca_weights(model: nn.Module, *, learnt: bool = False) -> Dict[str, float]:
    """Per layer, how much CCA still contributes (1 - alpha); only layers that still have CCA.
    ``learnt=True`` gives the learnt values, before any annealing limit (``set_cca_limit``)."""
    return {name: m.cca_weight(learnt) for name, m in scheme_mixers(model).items() if m.has_cca}


def max_relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |other - reference| / max |reference|: how the fused model is checked against the unfused one."""
    return float((other - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def set_cca_limit(model: nn.Module, limit: float) -> None:
    """Cap every layer's CCA weight at ``limit`` times its learnt value (1 = free, 0 = CCA off).
    Annealing it to 0 over training forces ``1 - alpha`` to zero by the end."""
    if not 0.0 <= limit <= 1.0:
        raise ValueError(f"set_cca_limit: limit={limit} must lie in [0, 1]")
    for m in scheme_mixers(model).values():
        if m.has_cca:
            m.cca_limit.fill_(limit)


@contextlib.contextmanager
def cca_in_eval(model: nn.Module) -> Iterator[None]:
    """Inside, SCHEME mixers in eval mode also run their CCA branch (the training function, no dropout)."""
    mixers = [m for m in scheme_mixers(model).values() if m.has_cca]
    for m in mixers:
        m.cca_in_eval = True
    try:
        yield
    finally:
        for m in mixers:
            m.cca_in_eval = False


def fuse_for_inference(
        model: nn.Module,
        example_inputs: Optional[Any] = None,
        *,
        warn_threshold: Optional[float] = None,
) -> nn.Module:
    """Fuse every SCHEME mixer in place (CCA removed, alpha folded into fc2); returns the model.

    The report of what was discarded is logged and kept as ``model.scheme_fuse_report``. A layer whose
    CCA weight exceeds ``warn_threshold`` (default: the config's ``fuse_warn_threshold``) is warned about.
    Given ``example_inputs`` (a tensor, or a tuple of positional inputs), the report also holds the relative
    change of the model output that fusing causes against the training-time function.
    Fusing a fused model does nothing.
    """
    mixers = scheme_mixers(model)
    config = getattr(model, "scheme_config", None)
    if not mixers and config is None:
        raise ValueError(
            f"fuse_for_inference: {type(model).__name__} has no SCHEME mixers; "
            "call timm_scheme.scheme_patch(model, ...) first")
    to_fuse = {name: m for name, m in mixers.items() if m.has_cca}
    if warn_threshold is None:
        warn_threshold = config.fuse_warn_threshold if config is not None else 0.01
    report = FuseReport(threshold=warn_threshold)
    if not to_fuse:
        model.scheme_fuse_report = getattr(model, "scheme_fuse_report", report)
        _logger.info("fuse_for_inference: already fused, nothing to do")
        return model

    report.cca_weights = {name: m.cca_weight() for name, m in to_fuse.items()}
    report.above_threshold = [n for n, w in report.cca_weights.items() if w > warn_threshold]
    reference = None
    if example_inputs is not None:
        with _eval_no_grad(model), cca_in_eval(model):
            reference = _run(model, example_inputs)

    for m in to_fuse.values():
        m.fuse()

    if reference is not None:
        with _eval_no_grad(model):
            fused = _run(model, example_inputs)
        report.relative_output_change = _relative_change(reference, fused)
    model.scheme_fuse_report = report
    _logger.info("fuse_for_inference: %s", report.summary())
    if report.above_threshold:
        shown = ", ".join(f"{n} ({report.cca_weights[n]:.3g})" for n in report.above_threshold[:8])
        more = len(report.above_threshold) - 8
        warnings.warn(
            f"fuse_for_inference: {len(report.above_threshold)} layer(s) discarded a CCA weight above "
            f"{warn_threshold}: {shown}{f' and {more} more' if more > 0 else ''}. The fused model equals the "
            "eval-mode model, but differs from the training-time function there; train longer or anneal "
            "CCA (timm_scheme.set_cca_limit) to make it negligible.",
            stacklevel=2)
    return model


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


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
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(reference, fused))
    den = sum(float(a.pow(2).sum()) for a in reference)
    return (num / max(den, 1e-30)) ** 0.5
