"""The Hugging Face Hub side: pushing a checkpoint folder in one commit, fetching files with errors that
say what to do, and ``from_pretrained``."""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import timm
from huggingface_hub import CommitInfo, HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from timm.models._hub import hf_split
from torch import nn

from .format import CARD_NAME, CONFIG_NAME, ENTRYPOINT, ENTRYPOINTS, WEIGHTS_NAME, CheckpointFormatError
from .save import save_pretrained

_logger = logging.getLogger(__name__)
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+(@.+)?")


def push_to_hub(
        model: nn.Module,
        repo_id: str,
        *,
        token: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        create_pr: bool = False,
        commit_message: str = "Upload SCHEME model with timm-scheme",
        replace_model_card: bool = False,
        **save_options: Any,
) -> CommitInfo:
    """Save a patched timm model as :func:`save_pretrained` does and upload the folder in one commit.

    The repository is created if needed. As with timm's ``push_to_hf_hub``, a model card already on the Hub
    is kept unless ``replace_model_card=True``. ``token`` defaults to the logged-in one (``HF_TOKEN`` or
    ``hf auth login``); it is sent to the Hub only, never logged. ``revision`` names an existing branch.
    Other keyword arguments go to :func:`save_pretrained`. Returns the commit's :class:`CommitInfo`.
    """
    api = _api(token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory(prefix="timm-scheme-push-") as tmp:
        folder = save_pretrained(model, Path(tmp) / repo_id.split("/")[-1], repo_id=repo_id, **save_options)
        return _upload(api, folder, repo_id, revision=revision, create_pr=create_pr, commit_message=commit_message,
                       replace_model_card=replace_model_card)


def push_folder_to_hub(
        folder: Union[str, os.PathLike],
        repo_id: str,
        *,
        token: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        create_pr: bool = False,
        commit_message: str = "Upload SCHEME model with timm-scheme",
        replace_model_card: bool = False,
) -> CommitInfo:
    """Upload a folder written by :func:`save_pretrained` as it is, in one commit (see :func:`push_to_hub`)."""
    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}; write the checkpoint with timm_scheme.save_pretrained")
    _check_config(folder / CONFIG_NAME, str(folder))
    api = _api(token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return _upload(api, folder, repo_id, revision=revision, create_pr=create_pr, commit_message=commit_message,
                   replace_model_card=replace_model_card)


def _api(token: Optional[str]) -> HfApi:
    from ..version import __version__
    return HfApi(token=token, library_name="timm-scheme", library_version=__version__)


def _upload(api: HfApi, folder: Path, repo_id: str, *, revision: Optional[str], create_pr: bool,
            commit_message: str, replace_model_card: bool) -> CommitInfo:
    files = [CONFIG_NAME, WEIGHTS_NAME]
    if (folder / CARD_NAME).is_file():
        if replace_model_card or not api.file_exists(repo_id, CARD_NAME, revision=revision):
            files.append(CARD_NAME)
        else:
            _logger.info("keeping the %s already in %s (pass replace_model_card=True to replace it)",
                         CARD_NAME, repo_id)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=files, revision=revision,
                             create_pr=create_pr, commit_message=commit_message)
    _logger.info("pushed %s to %s: %s", ", ".join(files), repo_id, info.pr_url or info.commit_url)
    return info


def from_pretrained(
        name_or_path: Union[str, os.PathLike],
        *,
        pretrained: bool = True,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        **kwargs: Any,
) -> nn.Module:
    """Load a SCHEME checkpoint: ``'hf-hub:org/name[@revision]'``, ``'local-dir:path'``, a folder path, or
    ``'org/name'`` for the Hub. Other keyword arguments go to ``timm.create_model`` (``num_classes``,
    ``features_only``, ``pretrained_cfg_overlay``, ...). Same result as ``timm.create_model``, with its
    config checked first so a wrong source fails with a clear message."""
    model_name = _model_name(name_or_path)
    source, _, location = model_name.partition(":")
    if source == "hf-hub":
        repo_id, revision = hf_split(location)
        config_path = download(repo_id, CONFIG_NAME, revision=revision, cache_dir=cache_dir)
    else:
        folder = Path(location)
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
            raise FileNotFoundError(
                f"{folder} has no {CONFIG_NAME}" + (f" (it holds {present})" if present is not None else
                                                    " (the folder does not exist)")
                + "; save a checkpoint there with timm_scheme.save_pretrained(model, folder)")
    _check_config(config_path, model_name)
    return timm.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir, **kwargs)


def _model_name(name_or_path: Union[str, os.PathLike]) -> str:
    name = os.fspath(name_or_path)
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    if Path(name).expanduser().exists():
        return f"local-dir:{Path(name).expanduser().absolute()}"
    if isinstance(name_or_path, str) and _REPO_ID.fullmatch(name):
        return f"hf-hub:{name}"
    raise FileNotFoundError(
        f"{name!r} is not an existing folder; pass a checkpoint folder, 'local-dir:path' or a Hub repository "
        "as 'org/name' or 'hf-hub:org/name'")


def _check_config(path: Path, model_name: str) -> None:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"{model_name}: {CONFIG_NAME} is not readable JSON ({e})") from e
    architecture = config.get("architecture") if isinstance(config, dict) else None
    if architecture not in ENTRYPOINTS:
        raise CheckpointFormatError(
            f"{model_name} holds a {'timm model ' + repr(architecture) if architecture else 'config'} that is not a "
            f"SCHEME checkpoint (architecture {ENTRYPOINT!r}); load a plain timm model with "
            f"timm.create_model({model_name!r}, pretrained=True)")


def download(repo_id: str, filename: str, *, revision: Optional[str] = None,
             cache_dir: Optional[Union[str, os.PathLike]] = None, token: Optional[str] = None) -> Path:
    """``hf_hub_download`` with errors that name the repository, the file and what would work."""
    from ..version import __version__

    where = f"hf-hub:{repo_id}" + (f"@{revision}" if revision else "")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, token=token,
                                    library_name="timm-scheme", library_version=__version__))
    except RemoteEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{where} has no {filename}; a SCHEME checkpoint holds {CONFIG_NAME}, model.safetensors and "
            f"{CARD_NAME} (upload them with timm_scheme.push_to_hub)") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"{where}: revision {revision!r} does not exist in {repo_id}") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"{where}: no such repository at {constants.ENDPOINT}, or it is private and no valid token was given "
            "(log in with `hf auth login`, or set HF_TOKEN)") from e
    except LocalEntryNotFoundError as e:
        reason = ("offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE
                  else f"the Hub at {constants.ENDPOINT} could not be reached")
        raise LocalEntryNotFoundError(
            f"{where}: {filename} is not in the local Hub cache and {reason}. Load it once while online (unset "
            "HF_HUB_OFFLINE), or copy the checkpoint folder and load it with 'local-dir:<folder>'") from e
