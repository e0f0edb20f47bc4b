"""Weight files: safetensors checkpoints (written, inspected, checked against a model) and timm training
checkpoints (read for export). Nothing here unpickles except through ``torch.load(weights_only=True)``."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import struct
import threading
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from timm.models import clean_state_dict
from torch import nn

from ..layers import SchemeMlp
from ..mixers import scheme_mixers
from .format import FORMAT_VERSION, CheckpointFormatError, CheckpointSpec

DIGEST_KEY = "weights_sha256"
_CCA_TENSORS = SchemeMlp.TRAINING_STATE
_SAFE_GLOBALS_LOCK = threading.Lock()


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of every tensor, in name order: independent of file layout,
    so it can be stored inside the file it describes and checked on the tensors a loader returns."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_safetensors(state_dict: Mapping[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    tensors, seen = {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        # safetensors refuses tensors sharing memory (tied weights): store each one on its own
        tensors[name] = tensor.clone() if storage in seen and tensor.numel() else tensor
        seen.add(storage)
    safetensors.torch.save_file(tensors, str(path), metadata=dict(metadata, **{DIGEST_KEY: weights_digest(tensors)}))
    _sort_header(path)


def _sort_header(path: Path) -> None:
    """Rewrite the JSON header with sorted keys, in place and at the same length: safetensors writes it in
    hash-map order, so the same weights would give different bytes (and Hub uploads) on every save."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        text = json.dumps(header, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
        if len(text) <= length:  # always, unless the writer changes its JSON style: then keep its header
            f.seek(8)
            f.write(text + b" " * (length - len(text)))


def safetensors_metadata(path: Path) -> Dict[str, str]:
    """The header metadata of a safetensors file, after checking the header covers the whole file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointFormatError(
            f"{path} ({path.stat().st_size:,} bytes) is not a readable safetensors file; it is truncated or "
            f"corrupted ({e}). Write it again (timm_scheme.save_pretrained / push_to_hub), or for a Hub download "
            "delete this cached file so it is fetched again") from e
    version = metadata.get("scheme_format_version")
    if version is not None and (not version.isdigit() or int(version) > FORMAT_VERSION):
        raise CheckpointFormatError(
            f"{path}: scheme_format_version {version!r} is not one this timm-scheme can read (up to "
            f"{FORMAT_VERSION}); upgrade it: pip install -U timm-scheme")
    return metadata


def check_digest(state_dict: Mapping[str, torch.Tensor], expected: Optional[str], source: str) -> None:
    if expected and weights_digest(state_dict) != expected:
        raise CheckpointFormatError(
            f"{source}: the tensors do not match the checksum recorded in the file ({DIGEST_KEY}); the file is "
            "corrupted. Write it again, or for a Hub download delete the cached file so it is fetched again")


def check_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        model: nn.Module,
        *,
        source: str,
        spec: Optional[CheckpointSpec] = None,
        skip: Iterable[str] = (),
        skip_shape: Iterable[str] = (),
        what: str = "the model described by its config.json",
        arguments_hint: str = "the model_args in config.json",
) -> None:
    """Raise a :class:`CheckpointFormatError` naming every missing, unexpected or mis-shaped tensor.

    ``skip`` names keys timm adapts itself (a classifier replaced for a new ``num_classes``); ``skip_shape``
    keys whose shape it adapts (an input conv for a new ``in_chans``).
    """
    expected = model.state_dict()
    skip, skip_shape = set(skip), set(skip_shape) | set(skip)
    missing = [k for k in expected if k not in state_dict and k not in skip and not _schedule_state_of_format_1(k, state_dict)]
    unexpected = [k for k in state_dict if k not in expected and k not in skip]
    mismatched = [
        (k, tuple(state_dict[k].shape), tuple(expected[k].shape)) for k in state_dict
        if k in expected and k not in skip_shape and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source}: the weights do not fit {what}" + (f" ({_describe(spec)})" if spec else "")]
    if missing:
        lines.append(f"  missing from the weights ({len(missing)}): {_abbreviate(missing)}")
    if unexpected:
        lines.append(f"  unexpected in the weights ({len(unexpected)}): {_abbreviate(unexpected)}")
    if mismatched:
        shown = "; ".join(f"{k}: weights {a} vs model {b}" for k, a, b in mismatched[:4])
        more = f"; and {len(mismatched) - 4} more" if len(mismatched) > 4 else ""
        lines.append(f"  shape mismatch ({len(mismatched)}): {shown}{more}")
    lines.extend(f"  hint: {h}" for h in _hints(missing, unexpected, mismatched, spec))
    mixers = tuple(f"{name}." for name in scheme_mixers(model))
    outside = [k for k in missing + unexpected + [k for k, _, _ in mismatched] if not k.startswith(mixers)]
    if outside:
        lines.append(f"  hint: tensors outside the SCHEME mixers differ too ({outside[0]}, ...): the base model was "
                     "built with other constructor arguments than the weights were trained with (img_size, "
                     f"patch_size, depth, num_classes, ...); check {arguments_hint}")
    raise CheckpointFormatError("\n".join(lines))


def _schedule_state_of_format_1(key: str, state_dict: Mapping[str, torch.Tensor]) -> bool:
    """The annealing state of an unfused mixer, absent from format-1 checkpoints: loading starts it afresh."""
    prefix, _, name = key.rpartition(".")
    return name in ("cca_step", "cca_fade", "cca_lr_peak") and f"{prefix}.mix_logits" in state_dict


def _describe(spec: CheckpointSpec) -> str:
    c = spec.config
    return (f"{spec.base_architecture}, groups={c.groups}, expansion={c.expansion}, cca={c.cca}, "
            f"fused={str(spec.fused).lower()}")


def _abbreviate(keys: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _hints(missing: List[str], unexpected: List[str], mismatched: List[Tuple[str, tuple, tuple]],
           spec: Optional[CheckpointSpec]) -> List[str]:
    hints = []
    is_cca = lambda k: k.rsplit(".", 1)[-1] in _CCA_TENSORS  # noqa: E731
    if any(map(is_cca, unexpected)):
        hints.append("the weights hold CCA mixing logits (an unfused training model) but the model was built "
                     "without CCA" + (": the config says fused=true" if spec and spec.fused else
                                      " (fused, or cca=False)"))
    if any(map(is_cca, missing)):
        hints.append("the weights have no CCA mixing logits (a fused model, or cca=False) but the model was built "
                     "with CCA" + (": the config says fused=false" if spec and not spec.fused else ""))
    dense = [(key, have) for key, have, want in mismatched if len(want) == 3 and len(have) != 3]
    if dense:  # e.g. a checkpoint of timm's train.py run without the scheme_patch line
        key, have = dense[0]
        hints.append(f"{key} is a dense {have} tensor in the weights, block diagonal in the model: these are the "
                     "weights of the unpatched model (was scheme_patch applied after create_model in the training "
                     "script?); to start SCHEME from them, load them into the dense model and call "
                     "scheme_patch(model, ..., init=\"dense\") (timm-scheme train --init dense --initial-checkpoint "
                     "PATH)")
    for key, have, want in mismatched:
        if key.endswith(("fc1.weight", "fc2.weight")) and len(have) == 3 and len(want) == 3:
            hints.append(f"{key} is block diagonal with groups={have[0]} in the weights but groups={want[0]} in the "
                         "model; the groups/expansion options differ from those the weights were trained with")
            break
    return hints


def read_training_checkpoint(path: os.PathLike, *, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The state dict of a timm training checkpoint (a bare state dict, or a dict with ``state_dict`` /
    ``state_dict_ema`` as timm's train script writes it), and what else it says (``key``, ``epoch``,
    ``metric``, ``arch``, ``args`` as a dict). ``.safetensors`` files are read as a bare state dict."""
    path = Path(path)
    if not path.is_file():
        where = path.parent if path.parent.is_dir() else None
        near = sorted(p.name for p in where.iterdir())[:10] if where else []
        raise FileNotFoundError(
            f"checkpoint {path} does not exist" + (f"; {where} holds {near}" if where else ""))
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path)), {"key": None}
        except SafetensorError as e:
            raise CheckpointFormatError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from e
    try:
        # timm's train script stores its argparse.Namespace under 'args'; it is a plain attribute bag. The
        # allow-list is process-wide and restored on exit: one load at a time, or a thread finishing its load
        # would take Namespace off the list under another's
        with _SAFE_GLOBALS_LOCK, torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointFormatError(
            f"{path}: refused to load it: it needs Python objects that torch.load(weights_only=True) does not "
            f"allow{_unsafe_globals(path)}. timm-scheme never unpickles arbitrary code; save the weights alone "
            "(torch.save({'state_dict': model.state_dict()}, path)) and export that") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointFormatError(
            f"{path} ({path.stat().st_size:,} bytes) is not a readable PyTorch checkpoint; it is truncated or "
            f"corrupted ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    return _pick_state_dict(checkpoint, path, use_ema)


def _pick_state_dict(checkpoint: Any, path: Path, use_ema: bool) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    if not isinstance(checkpoint, dict):
        raise CheckpointFormatError(f"{path} holds a {type(checkpoint).__name__}, not a state dict or a checkpoint dict")
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        if use_ema:
            raise CheckpointFormatError(f"{path} is a bare state dict; it has no EMA weights (drop --use-ema)")
        return clean_state_dict(checkpoint), {"key": None}
    keys = ("state_dict_ema", "model_ema") if use_ema else ("state_dict", "model")
    key = next((k for k in keys if isinstance(checkpoint.get(k), dict)), None)
    if key is None:
        raise CheckpointFormatError(
            f"{path} has no {' or '.join(repr(k) for k in keys)} entry (it has {sorted(checkpoint)[:10]}); "
            + ("drop --use-ema to export the trained weights" if use_ema else "expected a timm training checkpoint"))
    args = checkpoint.get("args")
    info = {
        "key": key,
        "epoch": checkpoint.get("epoch"),
        "metric": checkpoint.get("metric"),
        "arch": checkpoint.get("arch"),
        "args": vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else None,
    }
    return clean_state_dict(checkpoint[key]), info


def _unsafe_globals(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # only used to improve the message
        return ""
    return f" ({', '.join(names)})" if names else ""
