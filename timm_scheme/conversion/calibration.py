"""Calibration I/O: the calibration images as batches, each dense layer's input and output tokens on them, and the
per-unit statistics from which the assignment minimises a layer's output error on real activations."""
from __future__ import annotations

import functools
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import SchemeMlp
from ..modes import eval_mode
from ..patching.timm_mlps import read_mlp
from .units import DenseMlpWeights, on_routes

CalibrationData = Union[torch.Tensor, Iterable]
_TOKEN_CHUNK = 4096  # tokens per calibration pass: keeps the (tokens, hidden) scratch small on big models


class OutputErrorStats:
    """Per (unit, group) statistics of one layer's hidden activations on calibration tokens, from which
    ``scores()`` gives minus the error each unit adds to the layer output when cut to one group's block."""

    def __init__(self, mlp: nn.Module, weights: DenseMlpWeights, groups: int):
        self.layout, self.weights, self.groups = read_mlp("", mlp), weights, groups
        hidden = weights.hidden_features
        self.full_sq = torch.zeros(hidden, dtype=torch.float64)
        self.cross = torch.zeros(hidden, groups, dtype=torch.float64)
        self.block_sq = torch.zeros(hidden, groups, dtype=torch.float64)
        self.tokens = 0

    @torch.no_grad()
    def add(self, tokens: torch.Tensor) -> None:
        """Add (tokens, in_features) inputs of the layer."""
        for chunk in tokens.float().split(_TOKEN_CHUNK):
            self._add_chunk(chunk)

    def _add_chunk(self, x: torch.Tensor) -> None:
        c_in = x.shape[1]
        full = self._hidden(x, slice(None))
        self.full_sq += full.double().pow(2).sum(0).cpu()
        size = c_in // self.groups
        for k in range(self.groups):
            part = self._hidden(x, slice(k * size, (k + 1) * size))
            self.cross[:, k] += (full * part).double().sum(0).cpu()
            self.block_sq[:, k] += part.double().pow(2).sum(0).cpu()
        self.tokens += x.shape[0]

    def _hidden(self, x: torch.Tensor, cols: slice) -> torch.Tensor:
        """Hidden activations using only input channels ``cols`` (all of fc1's biases)."""
        w = self.weights
        first = F.linear(x[:, cols], w.fc1_first[:, cols].float(), _float(w.bias1_first))
        layout = self.layout
        if w.fc1_second is None:
            if layout.norm_first:  # a per-unit norm (ConvMlp's BatchNorm) before the activation
                first = layout.norm(first[:, :, None, None].to(w.fc1_first.dtype)).float().flatten(1)
            return layout.act(first.to(w.fc1_first.dtype)).float()
        second = F.linear(x[:, cols], w.fc1_second[:, cols].float(), _float(w.bias1_second))
        act = layout.act
        if layout.gate_last:
            return first * act(second.to(w.fc1_first.dtype)).float()
        return act(first.to(w.fc1_first.dtype)).float() * second

    def scores(self, shuffle: bool = False) -> torch.Tensor:
        """(hidden, routes): minus the mean squared output error of unit h kept on one route only (reading
        input group i, writing output group j; i = j without ``shuffle``, see ``Routes``)."""
        if not self.tokens:
            raise ValueError("calibration_data reached no token of this layer")
        w2 = self.weights.fc2.double().cpu().pow(2)
        full_norm = w2.sum(0)                                           # ||fc2[:, h]||^2
        block_norm = w2.reshape(self.groups, -1, w2.shape[1]).sum(1).t()  # ||fc2[O_j, h]||^2
        kept = 2 * self.cross - self.block_sq                           # per input group i
        error = (full_norm * self.full_sq)[:, None, None] - kept[:, :, None] * block_norm[:, None, :]
        return -(on_routes(error, shuffle) / self.tokens).float()


def _float(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float()


def calibration_batches(data: CalibrationData) -> List[torch.Tensor]:
    """The calibration images as a list of batches (read once: the conversion passes over them twice)."""
    if isinstance(data, torch.Tensor):
        return [data]
    try:
        iterator = iter(data)
    except TypeError:
        raise ValueError(
            f"calibration_data: expected a tensor of images or an iterable of batches (tensors or "
            f"(images, targets) pairs), got {type(data).__name__}") from None
    batches = []
    for batch in iterator:
        if isinstance(batch, (tuple, list)) and batch:
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            raise ValueError(f"calibration_data: a batch is a {type(batch).__name__}, expected a tensor of images")
        batches.append(batch)
    if not batches:
        raise ValueError("calibration_data holds no batch; pass a few hundred images or leave it out")
    return batches


@torch.no_grad()
def run_dense_layers(model: nn.Module, layers: Dict[str, nn.Module], batches: List[torch.Tensor],
                     consume: Callable[[str, torch.Tensor, torch.Tensor], None]) -> None:
    """Run the (still dense) model in eval mode on every batch, handing each layer's (input, output) tokens,
    channels last, to ``consume(name, x, y)``."""
    def hook(module, args, output, name):
        channel_dim = 1 if _is_conv(module) else args[0].dim() - 1
        consume(name, _tokens(args[0], channel_dim), _tokens(output, channel_dim))

    hooks = [m.register_forward_hook(functools.partial(hook, name=name)) for name, m in layers.items()]
    seen = set()
    counter = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.add(name)) for name, m in layers.items()]
    device = next(model.parameters()).device
    try:
        with eval_mode(model):
            for i, batch in enumerate(batches):
                try:
                    model(batch.to(device))
                except Exception as error:  # noqa: BLE001 - re-raised with what the user passed
                    raise ValueError(
                        f"scheme_patch(init='dense'): calibration batch {i} of shape {tuple(batch.shape)} does not "
                        f"run through {type(model).__name__}: {error}") from error
    finally:
        for h in hooks + counter:
            h.remove()
    missing = sorted(set(layers) - seen)
    if missing:
        raise ValueError(f"scheme_patch(init='dense'): calibration_data never reached layer(s) {missing[:3]}")


class _Reached(Exception):
    """Stops a forward pass once the layer of interest has run."""


def layer_io_tokens(model: nn.Module, name: str, batch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Layer ``name``'s input and output on ``batch`` as (tokens, channels), the model run only that far."""
    module = model.get_submodule(name)
    captured = []

    def hook(mod, args, output):
        channel_dim = 1 if _is_conv(mod) else args[0].dim() - 1
        captured.append((_tokens(args[0], channel_dim), _tokens(output, channel_dim)))
        raise _Reached

    handle = module.register_forward_hook(hook)
    try:
        model(batch.to(next(model.parameters()).device))
    except _Reached:
        pass
    except Exception as error:  # noqa: BLE001 - re-raised with what the user passed
        raise ValueError(f"calibration_data: a batch of shape {tuple(batch.shape)} does not run through "
                         f"{type(model).__name__}: {error}") from error
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"calibration: a batch of shape {tuple(batch.shape)} never reached layer {name}")
    return captured[0]


def _is_conv(mlp: nn.Module) -> bool:
    return mlp.use_conv if isinstance(mlp, SchemeMlp) else read_mlp("", mlp).use_conv


def _tokens(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim]).float()


def relative_output_error(reference: torch.Tensor, output: torch.Tensor) -> float:
    """||reference - output|| / ||reference||, in float64."""
    ref = reference.double()
    return float((ref - output.double()).norm() / ref.norm().clamp_min(1e-30))
