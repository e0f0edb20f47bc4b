"""ONNX export of fused SCHEME models: timm's exporter (torch.export based, dynamic batch), written to a
temporary file beside the target and checked with onnxruntime against PyTorch before it replaces anything.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from timm.utils.onnx import onnx_export
from torch import nn

from ..modes import eval_mode
from .artifacts import (ExportVerificationError, check_fused, example_size, largest_difference, random_images,
                        staged_file)

_logger = logging.getLogger(__name__)

MIN_OPSET = 17  # LayerNormalization, which every timm ViT needs, is an ONNX op from opset 17
_REQUIRED_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# one self-contained file: protobuf caps it at 2 GiB (timm's headroom for the graph itself)
_MAX_WEIGHT_BYTES = 2 ** 31 - 2 ** 27


class OnnxVerificationError(ExportVerificationError):
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
    check_fused(model, "export_onnx")
    _check_options(opset, batch_size, tolerance)
    _check_packages()
    _check_weights(model)
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"export_onnx: {path} is a folder; pass a file path such as {path / 'model.onnx'}")
    size = example_size(model, input_size, "export_onnx")
    with eval_mode(model), staged_file(path) as staging:
        onnx_export(model, str(staging), example_input=random_images(model, batch_size, size, seed=0),
                    opset=opset, use_dynamo=True, external_data=False, check=True)
        error = _verify(staging, model, random_images(model, batch_size + 1, size, seed=1), tolerance)
    _logger.info("export_onnx: wrote %s (opset %d, onnxruntime vs PyTorch: max relative difference %.2e)",
                 path, opset, error)
    return path


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


def _verify(onnx_path: Path, model: nn.Module, images: torch.Tensor, tolerance: float) -> float:
    """Largest relative difference of the ONNX graph's outputs against the model's, at another batch size."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch_dim = session.get_inputs()[0].shape[0]
    if not isinstance(batch_dim, str):
        raise OnnxVerificationError(f"export_onnx: the exported batch dimension is fixed at {batch_dim}")
    got = session.run(None, {session.get_inputs()[0].name: images.cpu().numpy()})
    error = largest_difference([torch.from_numpy(g) for g in got], model, images, "export_onnx")
    if not error <= tolerance:
        raise OnnxVerificationError(
            f"export_onnx: onnxruntime differs from PyTorch by {error:.2e} (max |onnx - torch| / max |torch|, "
            f"batch {images.shape[0]}) > tolerance={tolerance:g}; nothing was written")
    return error


__all__ = ["export_onnx", "OnnxVerificationError", "MIN_OPSET"]
