"""ONNX export of fused SCHEME models: timm's exporter (torch.export based, dynamic batch), written to a
temporary file beside the target and checked with onnxruntime against PyTorch before it replaces anything.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import uuid
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from timm.models._input import get_model_input_config
from timm.utils.onnx import onnx_export
from torch import nn
from torch.utils._pytree import tree_leaves

from ..fuse import max_relative_difference, scheme_mixers
from .save import _fsync

_logger = logging.getLogger(__name__)

MIN_OPSET = 17  # LayerNormalization, which every timm ViT needs, is an ONNX op from opset 17
_REQUIRED_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# one self-contained file: protobuf caps it at 2 GiB (timm's headroom for the graph itself)
_MAX_WEIGHT_BYTES = 2 ** 31 - 2 ** 27


class OnnxVerificationError(RuntimeError):
    """The exported ONNX graph does not reproduce the PyTorch model."""


def export_onnx(
        model: nn.Module,
        path: Union[str, os.PathLike],
        *,
        input_size: Optional[Sequence[int]] = None,
        batch_size: int = 2,
        opset: int = 18,
        tolerance: float = 1e-4,
) -> Path:
    """Export a fused SCHEME model to the ONNX file ``path``, batch dimension dynamic; returns the path.

    Traced with ``torch.export`` (timm's ``onnx_export``, dynamo exporter) on ``batch_size`` random images
    of ``input_size`` (C, H, W; default: the model's own), then run in onnxruntime on ``batch_size + 1``
    images: max|onnx - torch| / max|torch| must not exceed ``tolerance``. Only then does the file replace
    ``path``; any failure leaves an existing file untouched. The model is left in its training mode.
    """
    _check_fused(model)
    _check_options(opset, batch_size, tolerance)
    _check_packages()
    _check_weights(model)
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"export_onnx: {path} is a folder; pass a file path such as {path / 'model.onnx'}")
    size = _input_size(model, input_size)
    with _eval_mode(model), _staged_file(path) as staging:
        onnx_export(model, str(staging), example_input=_random_images(model, batch_size, size, seed=0),
                    opset=opset, use_dynamo=True, external_data=False, check=True)
        error = _verify(staging, model, _random_images(model, batch_size + 1, size, seed=1), tolerance)
    _logger.info("export_onnx: wrote %s (opset %d, onnxruntime vs PyTorch: max relative difference %.2e)",
                 path, opset, error)
    return path


def _check_fused(model: nn.Module) -> None:
    unfused = [name for name, mixer in scheme_mixers(model).items() if mixer.has_cca]
    if unfused:
        shown = ", ".join(unfused[:3]) + (f" and {len(unfused) - 3} more" if len(unfused) > 3 else "")
        raise ValueError(
            f"export_onnx: {len(unfused)} SCHEME mixer(s) still hold their training-time CCA branch ({shown}); "
            "call timm_scheme.fuse_for_inference(model) first and export the fused model")


def _check_options(opset: int, batch_size: int, tolerance: float) -> None:
    if opset < MIN_OPSET:
        raise ValueError(f"export_onnx: opset={opset} is too old; use opset >= {MIN_OPSET} (LayerNormalization)")
    if batch_size < 2:
        # torch.export specialises size-1 dimensions, which would fix the batch at 1
        raise ValueError(f"export_onnx: batch_size={batch_size}; use 2 or more so the batch dimension stays dynamic")
    if tolerance < 0:
        raise ValueError(f"export_onnx: tolerance={tolerance} must be >= 0")


def _check_packages() -> None:
    missing = [name for name in _REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"export_onnx needs {', '.join(_REQUIRED_PACKAGES)} (missing: {', '.join(missing)}); "
                          f"pip install 'timm-scheme[onnx]' (or pip install {' '.join(missing)})")


def _check_weights(model: nn.Module) -> None:
    tensors = [*model.parameters(), *model.buffers()]
    other = sorted({str(t.dtype) for t in tensors if t.is_floating_point() and t.dtype != torch.float32})
    if other:
        raise ValueError(f"export_onnx: exports float32 models, this one holds {', '.join(other)} tensors; "
                         "call model.float() first")
    size = sum(t.numel() * t.element_size() for t in tensors)
    if size > _MAX_WEIGHT_BYTES:
        raise ValueError(
            f"export_onnx: {size / 2 ** 30:.2f} GiB of weights do not fit one ONNX file (2 GiB protobuf limit); "
            "use torch.onnx.export(..., external_data=True) for a file plus a weights file")


def _input_size(model: nn.Module, input_size: Optional[Sequence[int]]) -> Tuple[int, ...]:
    if input_size is None:
        return tuple(get_model_input_config(model)["input_size"])
    size = tuple(int(v) for v in input_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"export_onnx: input_size={tuple(input_size)} must be (channels, height, width)")
    return size


def _random_images(model: nn.Module, batch: int, size: Tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded by its own generator: exporting does not move the caller's global RNG."""
    images = torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters(), torch.empty(0)).device
    return images.to(device)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _staged_file(path: Path) -> Iterator[Path]:
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


def _verify(onnx_path: Path, model: nn.Module, images: torch.Tensor, tolerance: float) -> float:
    """Largest relative difference of the ONNX graph's outputs against the model's, at another batch size."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch_dim = session.get_inputs()[0].shape[0]
    if not isinstance(batch_dim, str):
        raise OnnxVerificationError(f"export_onnx: the exported batch dimension is fixed at {batch_dim}")
    got = session.run(None, {session.get_inputs()[0].name: images.cpu().numpy()})
    with torch.no_grad():
        want: List[torch.Tensor] = tree_leaves(model(images))
    if len(got) != len(want):
        raise OnnxVerificationError(f"export_onnx: the ONNX graph has {len(got)} outputs, the model {len(want)}")
    error = max(max_relative_difference(w.float().cpu(), torch.from_numpy(g).float()) for g, w in zip(got, want))
    if not error <= tolerance:
        raise OnnxVerificationError(
            f"export_onnx: onnxruntime differs from PyTorch by {error:.2e} (max |onnx - torch| / max |torch|, "
            f"batch {images.shape[0]}) > tolerance={tolerance:g}; nothing was written")
    return error


__all__ = ["export_onnx", "OnnxVerificationError", "MIN_OPSET"]
