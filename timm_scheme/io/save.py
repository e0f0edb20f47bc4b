"""Saving a SCHEME model as a timm Hub checkpoint folder, atomically."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

from timm.models._hub import save_config_for_hf
from timm.models._input import get_model_input_config
from torch import nn

from .card import model_card
from .format import CARD_NAME, CONFIG_NAME, ENTRYPOINT, FORMAT_VERSION, WEIGHTS_NAME, CheckpointSpec, spec_of
from .weights import safetensors_metadata, write_safetensors

_logger = logging.getLogger(__name__)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # from <fcntl.h> and <linux/fs.h>

# pretrained_cfg entries describing the base architecture's published weights, not these
_BASE_PROVENANCE = ("tag", "license", "description", "origin_url", "paper_name", "paper_ids", "notes")


def save_pretrained(
        model: nn.Module,
        save_directory: Union[str, os.PathLike],
        *,
        overwrite: bool = False,
        base_architecture: Optional[str] = None,
        base_model: Optional[str] = None,
        license: Optional[str] = None,
        model_args: Optional[Dict[str, Any]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        repo_id: Optional[str] = None,
) -> Path:
    """Save a patched timm model (fused or not) as ``config.json`` + ``model.safetensors`` + ``README.md``.

    The folder is written next to its destination and moved into place, so an interrupted save never leaves
    a half-written checkpoint there. Load it back with ``timm.create_model('local-dir:<folder>', pretrained=True)``.

    Args:
        model: a model built by ``timm.create_model`` and patched by ``scheme_patch`` (optionally fused).
        save_directory: the checkpoint folder; an existing one is replaced only with ``overwrite=True``.
        base_architecture: the timm model name that was patched, when ``model.pretrained_cfg`` does not say.
        base_model: the Hub id of the weights training started from (model card ``base_model``).
        license: license of these weights (model card and ``pretrained_cfg``).
        model_args: serialisable replacements for constructor arguments timm cannot record.
        data_config: preprocessing to record, as for timm's ``save_for_hf``.
        repo_id: the Hub repository named in the model card's usage example.
    Returns:
        The checkpoint folder.
    """
    spec = spec_of(model, base_architecture)
    if not isinstance(getattr(model, "pretrained_cfg", None), dict):
        raise ValueError(
            f"{type(model).__name__} has no pretrained_cfg; build the model with timm.create_model(...) so its "
            "architecture and data config can be recorded")
    target = Path(save_directory).expanduser().absolute()
    from ..version import __version__

    with _atomic_folder(target, overwrite) as staging:
        write_safetensors(model.state_dict(), staging / WEIGHTS_NAME, metadata={
            "format": "pt",
            "scheme_format_version": str(FORMAT_VERSION),
            "timm_scheme_version": __version__,
        })
        config = _write_config(model, staging / CONFIG_NAME, spec, model_args=model_args, data_config=data_config,
                               license=license)
        input_size = config["pretrained_cfg"].get("input_size") or get_model_input_config(model)["input_size"]
        card = model_card(model, spec, name=repo_id.split("/")[-1] if repo_id else target.name,
                          input_size=input_size, repo_id=repo_id, base_model=base_model, license=license)
        (staging / CARD_NAME).write_text(card, encoding="utf-8")
        safetensors_metadata(staging / WEIGHTS_NAME)  # the file reads back before it replaces anything
    size = (target / WEIGHTS_NAME).stat().st_size
    _logger.info("saved %s SCHEME model (%s) to %s: %s (%.1f MB), %s, %s", "fused" if spec.fused else "unfused",
                 spec.base_architecture, target, WEIGHTS_NAME, size / 2 ** 20, CONFIG_NAME, CARD_NAME)
    return target


def _write_config(model: nn.Module, path: Path, spec: CheckpointSpec, *, model_args: Optional[Dict[str, Any]],
                  data_config: Optional[Dict[str, Any]], license: Optional[str]) -> Dict[str, Any]:
    save_config_for_hf(
        model, str(path),
        model_config={"pretrained_cfg": {"architecture": ENTRYPOINT}},
        model_args=dict(model_args or {}, scheme=spec.to_dict()),
        data_config=data_config,
    )
    config = json.loads(path.read_text(encoding="utf-8"))
    # the class count lives at the top level, where timm's loaders read it; transformers' TimmWrapper passes it as
    # its own keyword next to model_args, so a second copy there makes its from_pretrained fail
    config["model_args"].pop("num_classes", None)
    pretrained_cfg = config["pretrained_cfg"]
    for key in _BASE_PROVENANCE:
        pretrained_cfg.pop(key, None)
    if license:
        pretrained_cfg["license"] = license
    CheckpointSpec.from_dict(config["model_args"]["scheme"])  # what a loader will read
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config


@contextlib.contextmanager
def _atomic_folder(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; on success it replaces ``target`` in one rename."""
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace it, or choose another "
                "folder")
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a folder; remove it or choose another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    # the owner's pid in the name: a later save removes what a killed one left, never a running one's folder
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".partial", dir=target.parent))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(staging, 0o777 & ~mask)  # mkdtemp makes it private; a checkpoint folder is not
        yield staging
        for item in staging.iterdir():
            _fsync(item)
        _fsync(staging)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove_stale(target: Path) -> None:
    """Folders of earlier saves to ``target`` whose process died mid-write (SIGKILL, power loss)."""
    for path in target.parent.glob(f".{glob.escape(target.name)}.*"):
        parts = path.name[len(target.name) + 2:].split(".")
        if len(parts) != 3 or parts[2] not in ("partial", "old") or not parts[0].isdigit():
            continue
        if not _alive(int(parts[0])):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            _logger.info("removed %s, left by an interrupted save (process %s)", path, parts[0])


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform, libc or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def _swap_in(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``: one atomic exchange where Linux allows it (``target`` is never missing),
    else two renames with Ctrl-C held back between them."""
    old = None
    if target.is_dir() and not target.is_symlink() and _rename_exchange(staging, target):
        _fsync(target.parent)
        shutil.rmtree(staging, ignore_errors=True)  # it now holds the replaced checkpoint
        return
    with _interrupts_deferred():
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old")
            os.replace(target, old)
        try:
            os.replace(staging, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
        _fsync(target.parent)
    if old is not None:
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C between the renames that swap folders, then deliver it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, None)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. folders on platforms that cannot open them
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
