"""Switching a model's train/eval mode for a while and putting every submodule back as it was."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Inside, ``models`` are in eval mode; afterwards every submodule has its own mode back (a frozen
    BatchNorm kept in eval inside a training model stays so)."""
    saved = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training
