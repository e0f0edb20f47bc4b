"""What the deployment exports (ONNX, TorchScript) share: the fused-model check, example inputs, the
comparison with the eager model, and files written beside their target and renamed into place."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from timm.models._input import get_model_input_config
from torch import nn
from torch.utils._pytree import tree_leaves

from ..fuse import max_relative_difference
from ..mixers import scheme_mixers
from .save import _fsync


class ExportVerificationError(RuntimeError):
    """An exported model does not reproduce the PyTorch model."""


def check_fused(model: nn.Module, what: str) -> None:
    unfused = [name for name, mixer in scheme_mixers(model).items() if mixer.has_cca]
    if unfused:
        shown = ", ".join(unfused[:3]) + (f" and {len(unfused) - 3} more" if len(unfused) > 3 else "")
        raise ValueError(
            f"{what}: {len(unfused)} SCHEME mixer(s) still hold their training-time CCA branch ({shown}); "
            "call timm_scheme.fuse_for_inference(model) first and export the fused model")


def example_size(model: nn.Module, input_size: Optional[Sequence[int]], what: str) -> Tuple[int, ...]:
    if input_size is None:
        return tuple(get_model_input_config(model)["input_size"])
    size = tuple(int(v) for v in input_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"{what}: input_size={tuple(input_size)} must be (channels, height, width)")
    return size


def random_images(model: nn.Module, batch: int, size: Tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded by its own generator: exporting does not move the caller's global RNG."""
    images = torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters(), torch.empty(0)).device
    return images.to(device)


def largest_difference(got: Sequence[torch.Tensor], model: nn.Module, images: torch.Tensor, what: str) -> float:
    """max |exported - eager| / max |eager| over the outputs, the eager model run on ``images``."""
    with torch.no_grad():
        want: List[torch.Tensor] = tree_leaves(model(images))
    if len(got) != len(want):
        raise ExportVerificationError(f"{what}: the exported model has {len(got)} outputs, the model {len(want)}")
    return max(max_relative_difference(w.float().cpu(), g.float().cpu()) for g, w in zip(got, want))


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same file system); moved onto ``path`` in one rename on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield staging
        _fsync(staging)
        os.replace(staging, path)
        _fsync(path.parent)
    finally:
        staging.unlink(missing_ok=True)
