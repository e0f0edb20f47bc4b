"""The timm entry point that rebuilds saved SCHEME models.

``timm.create_model('hf-hub:org/name' | 'local-dir:path', pretrained=True)`` reads ``config.json``, finds
:data:`ENTRYPOINT` as its architecture and calls it with the saved ``model_args``: the base model is
built, patched and (for inference checkpoints) fused, then timm's own loader puts the weights in,
adapting the classifier for a new ``num_classes`` and the stem for a new ``in_chans`` as for any timm model.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import timm
import torch
from timm.models import build_model_with_cfg, get_pretrained_cfg, register_model, resolve_pretrained_cfg
from timm.models._builder import _resolve_pretrained_source, pretrained_cfg_for_features
from timm.models._features_fx import FeatureGraphNet
from timm.models._hub import hf_split
from torch import nn

from ..mixers import is_patched, scheme_mixers
from ..patching.patch import patch_structure
from .format import CONFIG_NAME, ENTRYPOINT, WEIGHTS_NAME, CheckpointFormatError, CheckpointSpec
from .weights import DIGEST_KEY, check_digest, check_state_dict, safetensors_metadata

_FEATURE_ARGS = ("out_indices", "feature_cls")


@register_model
def scheme_patched__import_timm_scheme_first(pretrained: bool = False, **kwargs) -> nn.Module:
    """ A timm model with SCHEME mixers, rebuilt from a checkpoint's ``model_args['scheme']``.
    Reached through ``timm.create_model('hf-hub:...' | 'local-dir:...')`` once ``timm_scheme`` is imported.
    """
    return _rebuild(ENTRYPOINT, pretrained, **kwargs)


@register_model
def scheme_patched(pretrained: bool = False, **kwargs) -> nn.Module:
    """ The same, under the architecture name of format-1 checkpoints."""
    return _rebuild("scheme_patched", pretrained, **kwargs)


def _rebuild(
        entrypoint: str,
        pretrained: bool = False,
        scheme: Optional[Dict[str, Any]] = None,
        pretrained_cfg: Optional[Any] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        cache_dir: Optional[str] = None,
        **kwargs,
) -> nn.Module:
    source = _source_name(pretrained_cfg)
    if scheme is None:
        raise TypeError(
            f"{ENTRYPOINT} rebuilds saved SCHEME checkpoints and needs their model_args['scheme']; load one with "
            "timm.create_model('hf-hub:org/name' or 'local-dir:path', pretrained=True), or patch a timm model "
            "with timm_scheme.scheme_patch")
    spec = CheckpointSpec.from_dict(scheme, source=source)
    if pretrained_cfg is None:
        pretrained_cfg = _default_cfg(spec)
    elif isinstance(pretrained_cfg, str):
        raise ValueError(f"{ENTRYPOINT} has no pretrained tags (got {pretrained_cfg!r}); load a checkpoint folder "
                         "or Hub repository instead")
    cfg = resolve_pretrained_cfg(entrypoint, pretrained_cfg, pretrained_cfg_overlay).to_dict()

    features_only = kwargs.pop("features_only", False)
    feature_args = {k: kwargs.pop(k) for k in _FEATURE_ARGS if k in kwargs}
    build_cfg, filter_fn = cfg, None
    if pretrained:
        build_cfg, filter_fn = _pin_weights(cfg, spec, cache_dir)
    builder = _Builder(spec, source)
    model = build_model_with_cfg(
        builder, entrypoint, pretrained,
        pretrained_cfg=build_cfg,
        pretrained_filter_fn=filter_fn,
        cache_dir=cache_dir,
        **kwargs,
    )
    model.pretrained_cfg = model.default_cfg = cfg  # where the weights came from, as timm reports it
    if features_only:
        model = _as_features(model, spec, builder.kwargs, feature_args, cfg)
    return model


class _Builder:
    """The model class handed to ``build_model_with_cfg``: base model -> patch -> fuse, with the kwargs it got."""

    def __init__(self, spec: CheckpointSpec, source: str):
        self.spec, self.source = spec, source
        self.kwargs: Dict[str, Any] = {}

    def __call__(self, **kwargs) -> nn.Module:
        self.kwargs = dict(kwargs)
        model = timm.create_model(self.spec.base_architecture, pretrained=False, **kwargs)
        _patch_like(model, self.spec, source=self.source)
        return model


def _patch_like(model: nn.Module, spec: CheckpointSpec, filter_fn: Optional[Callable] = None,
                source: str = CONFIG_NAME) -> None:
    if is_patched(model):  # an architecture registered with SCHEME mixers built in
        if getattr(model, "scheme_config", None) != spec.config:
            raise CheckpointFormatError(
                f"{spec.base_architecture} builds SCHEME mixers with {getattr(model, 'scheme_config', None)}, "
                f"but the checkpoint was saved with {spec.config}")
    else:
        if filter_fn is None and spec.modules is not None:
            filter_fn = lambda module, name: name in spec.modules  # noqa: E731
        try:
            patch_structure(model, spec.config, filter_fn)
        except ValueError as error:
            raise CheckpointFormatError(
                f"{source}: its {CONFIG_NAME} records SCHEME options ({spec.config.describe()}) that do not fit "
                f"{spec.base_architecture} as its model_args build it: {error}. The file was edited or written "
                "for another model; save the checkpoint again with timm_scheme.save_pretrained") from error
    if spec.fused:
        for mixer in scheme_mixers(model).values():
            mixer.fuse()


def _default_cfg(spec: CheckpointSpec) -> Dict[str, Any]:
    """Data config of the base architecture, without its weight sources: this entry point has no weights of its own."""
    base = get_pretrained_cfg(spec.base_architecture)
    values = base.to_dict(remove_source=True) if base is not None else {}
    values.update(architecture=ENTRYPOINT, tag=None)
    return values


def _source_name(cfg: Any) -> str:
    cfg = cfg if isinstance(cfg, Mapping) else {}
    if cfg.get("source") == "hf-hub" and cfg.get("hf_hub_id"):
        return f"hf-hub:{cfg['hf_hub_id']}"
    if cfg.get("source") == "local-dir" and cfg.get("file"):
        return f"local-dir:{cfg['file']}"
    return f"{ENTRYPOINT} model_args"


def _pin_weights(cfg: Dict[str, Any], spec: CheckpointSpec, cache_dir: Optional[str]) -> Tuple[Dict[str, Any], Callable]:
    """Find the weights file where timm would, check it can be read, and point timm's loader at exactly that file."""
    load_from, location = _resolve_pretrained_source(cfg)
    if load_from == "hf-hub":
        from .hub import download  # the Hub client is only needed for Hub sources
        hub_id, filename = location if isinstance(location, (tuple, list)) else (location, WEIGHTS_NAME)
        repo_id, revision = hf_split(hub_id)
        path = download(repo_id, filename, revision=revision, cache_dir=cache_dir)
        source = f"hf-hub:{hub_id} ({filename}, cached at {path})"
    elif load_from == "local-dir":
        path = Path(location) / WEIGHTS_NAME
        if not path.is_file():
            present = sorted(p.name for p in Path(location).iterdir()) if Path(location).is_dir() else []
            raise FileNotFoundError(
                f"local-dir:{location} has no {WEIGHTS_NAME} (it holds {present}); a SCHEME checkpoint folder holds "
                "config.json, model.safetensors and README.md as written by timm_scheme.save_pretrained")
        source = str(path)
    elif load_from == "file":
        path = Path(location)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained_cfg file {path} does not exist")
        source = str(path)
        if path.suffix != ".safetensors":  # timm reads it with torch.load(weights_only=True)
            return cfg, partial(_check_weights, spec=spec, cfg=cfg, source=source, digest=None)
    elif load_from in ("state_dict", "url"):
        return cfg, partial(_check_weights, spec=spec, cfg=cfg, source=load_from, digest=None)
    else:
        raise ValueError(
            f"{ENTRYPOINT} has no weights of its own; load saved ones with timm.create_model('hf-hub:org/name' or "
            "'local-dir:path', pretrained=True), or pass pretrained=False")
    digest = safetensors_metadata(path).get(DIGEST_KEY)
    pinned = dict(cfg, source=None, file=str(path), hf_hub_id=None, hf_hub_filename=None, url=None, state_dict=None)
    return pinned, partial(_check_weights, spec=spec, cfg=cfg, source=source, digest=digest)


def _check_weights(state_dict: Dict[str, torch.Tensor], model: nn.Module, *, spec: CheckpointSpec,
                   cfg: Dict[str, Any], source: str, digest: Optional[str]) -> Dict[str, torch.Tensor]:
    """timm's pretrained filter: runs on the loaded tensors before timm adapts and loads them."""
    check_digest(state_dict, digest, source)
    skip, skip_shape = set(), set()
    classifiers = _names(cfg.get("classifier"))
    if getattr(model, "num_classes", None) != cfg.get("num_classes"):
        skip |= {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")}  # timm drops the old head
    skip_shape |= {f"{c}.weight" for c in _names(cfg.get("first_conv"))}  # timm adapts the stem to in_chans
    check_state_dict(state_dict, model, source=source, spec=spec, skip=skip, skip_shape=skip_shape)
    return state_dict


def _names(value: Any) -> Tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _as_features(model: nn.Module, spec: CheckpointSpec, kwargs: Dict[str, Any], feature_args: Dict[str, Any],
                 cfg: Dict[str, Any]) -> nn.Module:
    """The base architecture's own features_only wrapper, patched alike and holding the loaded model's weights."""
    features = timm.create_model(spec.base_architecture, pretrained=False, features_only=True, **kwargs, **feature_args)
    if isinstance(features, FeatureGraphNet):
        # an FX graph of the base model would hold its dense MLP ops: trace the loaded SCHEME model instead,
        # at the taps the base architecture's wrapper chose
        features = FeatureGraphNet(model, out_indices=tuple(features.feature_info.out_indices),
                                   output_fmt=features.output_fmt.value)
        features.pretrained_cfg = features.default_cfg = pretrained_cfg_for_features(cfg)
        return features
    module_names = _normalised({name: name for name, _ in model.named_modules()})
    patched = set(scheme_mixers(model))
    _patch_like(features, spec, filter_fn=lambda m, name: _match(name, module_names) in patched)

    tensors = model.state_dict()
    tensor_names = _normalised({k: k for k in tensors})
    state = {}
    for key in features.state_dict():
        source_key = _match(key, tensor_names)
        if source_key is None:
            raise NotImplementedError(
                f"features_only: cannot tell which weight of {spec.base_architecture} feeds '{key}' of its "
                f"{type(features).__name__}; load the classifier model and call forward_intermediates instead")
        state[key] = tensors[source_key]
    features.load_state_dict(state, strict=True)
    features.pretrained_cfg = features.default_cfg = pretrained_cfg_for_features(cfg)
    return features


def _normalised(names: Dict[str, str]) -> Dict[str, Optional[str]]:
    # feature wrappers rename 'stages.0' to 'stages_0' or nest the model under 'model.'
    index: Dict[str, Optional[str]] = {}
    for key, name in names.items():
        norm = key.replace(".", "_")
        index[norm] = None if norm in index and index[norm] != name else name  # None marks an ambiguous name
    return index


def _match(name: str, index: Dict[str, Optional[str]]) -> Optional[str]:
    norm = name.replace(".", "_")
    if norm in index:
        return index[norm]
    if "." in name:
        return index.get(name.split(".", 1)[1].replace(".", "_"))
    return None
