"""The one place that decides which kernel runs.

Eager calls get the fast hand-written kernels (token tiles on CPU; on accelerators batched GEMMs, or the form
``set_accelerator_kernel`` picks). Anything that records the computation instead of running it
(``torch.jit.trace``/``script``, FX symbolic tracing, the legacy ONNX exporter) gets the plain forms: a few
standard ops with no ``out=`` writes, no loops whose trip count depends on the input and no autograd Functions,
so what is recorded is what eager computes at any batch size. ``torch.compile`` / ``torch.export`` and autocast
get the autograd-native per-group form.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
from torch import nn

try:  # torch >= 2.4 tells FX symbolic tracing apart from torch.export, which also sets the FX flag
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _fx_tracing
except ImportError:  # older torch: the flag alone
    from torch.fx._symbolic_trace import _get_is_fx_tracing as _fx_tracing  # type: ignore

PLAIN = "plain"            # traced / scripted: standard ops, one per group
PER_GROUP = "per_group"    # torch.compile, torch.export, autocast: autograd-native per group, then cat
BATCHED = "batched"        # eager on accelerators: one batched GEMM per projection on strided views
GROUPED_MM = "grouped_mm"  # eager on accelerators without autograd, opt-in: torch._grouped_mm per projection
SLICES = "slices"          # eager CPU without autograd: GEMMs written straight into output slices, token tiles
PER_GROUP_FN = "per_group_fn"  # eager CPU training: the per-group autograd Function (keeps hidden activations)
RECOMPUTE_FN = "recompute_fn"  # eager CPU training, opt-in: the tiled Function recomputing hidden tiles

# activations that mix channels or draw random numbers: the fused kernels apply the activation one group and
# one token tile at a time (and may recompute it in backward), so these take the layered path
_NOT_ELEMENTWISE = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU, nn.RReLU, nn.MultiheadAttention)
_ELEMENTWISE_MODULES = ("torch.nn.modules.activation", "timm.layers.activations")
_ELEMENTWISE_TYPES = ("timm.models.metaformer.StarReLU",)


# the eager accelerator form: `python -m benchmarks.gpu_check` times them side by side and says which is fastest
ACCELERATOR_KERNELS = (BATCHED, GROUPED_MM, PER_GROUP)
_accelerator = BATCHED
_cpu_as_accelerator = False


def set_accelerator_kernel(name: str) -> None:
    """Pick the eager form on accelerators: ``"batched"`` (default), ``"grouped_mm"`` (``torch._grouped_mm``
    where the device and dtype have it, without autograd; else batched) or ``"per_group"``. Also read from the
    environment variable ``TIMM_SCHEME_ACCELERATOR_KERNEL`` at import."""
    global _accelerator
    if name not in ACCELERATOR_KERNELS:
        raise ValueError(f"accelerator kernel {name!r}: expected one of {ACCELERATOR_KERNELS} (set by "
                         "timm_scheme.kernels.dispatch.set_accelerator_kernel or TIMM_SCHEME_ACCELERATOR_KERNEL)")
    _accelerator = name


def accelerator_kernel() -> str:
    return _accelerator


@contextlib.contextmanager
def cpu_as_accelerator() -> Iterator[None]:
    """Within it, CPU tensors take the accelerator forms: how the CPU smoke run of the accelerator check and the
    tests reach them on a machine without one."""
    global _cpu_as_accelerator
    previous, _cpu_as_accelerator = _cpu_as_accelerator, True
    try:
        yield
    finally:
        _cpu_as_accelerator = previous


def on_accelerator(x: torch.Tensor) -> bool:
    return x.device.type != "cpu" or _cpu_as_accelerator


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``torch._grouped_mm`` exists for these operands: CUDA wants bf16 on compute capability 9.0 or newer; the
    CPU kernel takes float32 and bf16."""
    if not hasattr(torch, "_grouped_mm") or x.device.type not in ("cuda", "cpu"):
        return False
    dtype = autocast_dtype(x) or x.dtype
    if x.device.type == "cuda":
        return dtype == torch.bfloat16 and weight.dtype in (torch.bfloat16, torch.float32) and \
            torch.cuda.get_device_capability(x.device) >= (9, 0)
    return dtype in (torch.float32, torch.bfloat16)


def _accelerator_form(x: torch.Tensor, tensors) -> str:
    if _accelerator == GROUPED_MM and (needs_grad(x, *tensors) or not grouped_mm_supported(x, tensors[0])):
        return BATCHED  # its backward is not usable everywhere, and not every device and dtype has it
    return _accelerator


def tracing() -> bool:
    """Recording rather than running: torch.jit.trace (also under the legacy ONNX exporter) or FX."""
    return torch.jit.is_tracing() or _fx_tracing()


def compiling() -> bool:
    return torch.compiler.is_compiling()


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def linear_kernel(x: torch.Tensor, *tensors: Optional[torch.Tensor]) -> str:
    """The form of one block-diagonal projection of channels-last ``x``."""
    if tracing():
        return PLAIN
    if on_accelerator(x):
        return _accelerator_form(x, tensors)
    if compiling() or needs_grad(x, *tensors) or autocast_dtype(x) is not None:
        return PER_GROUP
    return SLICES


def mlp_kernel(x: torch.Tensor, *tensors: Optional[torch.Tensor], recompute: bool = False) -> str:
    """The form of a whole fc1 -> hidden -> fc2 block-diagonal MLP on channels-last ``x``."""
    if tracing():
        return PLAIN
    if on_accelerator(x):
        return _accelerator_form(x, tensors)
    if compiling() or autocast_dtype(x) is not None:
        return PER_GROUP
    if not needs_grad(x, *tensors):
        return SLICES
    return RECOMPUTE_FN if recompute else PER_GROUP_FN


def nchw_on_tokens(x: torch.Tensor) -> bool:
    """Whether an NCHW block-diagonal MLP runs the token kernel on a channels-last copy of ``x`` (eager CPU,
    where two transposing copies and the token kernel beat any NCHW form) or on NCHW directly."""
    return x.device.type == "cpu" and not tracing() and not _cpu_as_accelerator


def is_elementwise(act: nn.Module) -> bool:
    """A known activation type that maps every element on its own (scalar parameters at most): the fused
    kernels may apply it group by group and tile by tile."""
    if isinstance(act, _NOT_ELEMENTWISE):
        return False
    kind = type(act)
    if not (isinstance(act, nn.Identity) or kind.__module__.startswith(_ELEMENTWISE_MODULES)
            or f"{kind.__module__}.{kind.__qualname__}" in _ELEMENTWISE_TYPES):
        return False
    return all(t.numel() <= 1 for t in (*act.parameters(), *act.buffers()))


set_accelerator_kernel(os.environ.get("TIMM_SCHEME_ACCELERATOR_KERNEL", BATCHED))
