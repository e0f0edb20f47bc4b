"""What a model's SCHEME mixers hold: listing them, their CCA weights, and whether the model is patched or fused.
The one place these questions are answered; nothing here changes a model but the CCA cap and switch."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator

from torch import nn

from .layers import SchemeMlp


def scheme_mixers(model: nn.Module) -> Dict[str, SchemeMlp]:
    """The model's SCHEME mixers by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SchemeMlp)}


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, "scheme_config") or any(isinstance(m, SchemeMlp) for m in model.modules())


def is_fused(model: nn.Module) -> bool:
    """No mixer holds a CCA branch: the inference form (also a model patched with ``cca=False``)."""
    return not any(m.has_cca for m in scheme_mixers(model).values())


def cca_weights(model: nn.Module, *, learnt: bool = False) -> Dict[str, float]:
    """Per layer, how much CCA still contributes (1 - alpha); only layers that still have CCA.
    ``learnt=True`` gives the learnt values, before the annealing cap."""
    return {name: m.cca_weight(learnt) for name, m in scheme_mixers(model).items() if m.has_cca}


def set_cca_limit(model: nn.Module, limit: float) -> None:
    """Cap every layer's CCA weight at ``limit`` times its value (1 = free, 0 = CCA off), on top of the
    schedule of ``SchemeConfig.cca_anneal``; for hand-written annealing."""
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
