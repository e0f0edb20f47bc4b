"""TorchScript export of fused SCHEME models: ``torch.jit.script`` (the scripted model keeps dynamic batch and
image sizes), saved to a temporary file beside the target, loaded back and checked against the eager model
at another batch size before it replaces anything."""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..modes import eval_mode
from .artifacts import ExportVerificationError, check_fused, example_size, largest_difference, random_images, staged_file

_logger = logging.getLogger(__name__)


def export_torchscript(
        model: nn.Module,
        path: Union[str, os.PathLike],
        *,
        input_size: Optional[Sequence[int]] = None,
        batch_size: int = 3,
        tolerance: float = 1e-5,
) -> Path:
    """Script a fused SCHEME model in eval mode and save it to ``path`` (load it with ``torch.jit.load``).

    The saved file is loaded back and run on ``batch_size`` random images of ``input_size`` (C, H, W; default:
    the model's own): max|scripted - eager| / max|eager| must not exceed ``tolerance``. Only then does the file
    replace ``path``; any failure leaves an existing file untouched. The model is left in its training mode.
    """
    check_fused(model, "export_torchscript")
    if batch_size < 1 or tolerance < 0:
        raise ValueError(f"export_torchscript: batch_size={batch_size} must be >= 1 and tolerance={tolerance} >= 0")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"export_torchscript: {path} is a folder; pass a file path such as {path / 'model.pt'}")
    size = example_size(model, input_size, "export_torchscript")
    with eval_mode(model), staged_file(path) as staging, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice: TorchScript is what is asked for
        torch.jit.script(model).save(str(staging))
        loaded = torch.jit.load(str(staging), map_location=next(model.parameters()).device)
        images = random_images(model, batch_size, size, seed=1)
        with torch.no_grad():
            got = loaded(images)
        error = largest_difference(list(got) if isinstance(got, (tuple, list)) else [got], model, images,
                                   "export_torchscript")
        if not error <= tolerance:
            raise ExportVerificationError(
                f"export_torchscript: the scripted model differs from PyTorch eager by {error:.2e} (max |scripted - "
                f"eager| / max |eager|, batch {batch_size}) > tolerance={tolerance:g}; nothing was written")
    _logger.info("export_torchscript: wrote %s (scripted vs eager: max relative difference %.2e)", path, error)
    return path


__all__ = ["export_torchscript"]
