"""A training checkpoint back into the model it was trained as: the timm model, its SCHEME structure and weights.

The checkpoint is timm's train-script format (``state_dict`` / ``state_dict_ema``, its ``args``), a bare state
dict, ``timm-scheme train``'s ``checkpoint.pth`` or a ``.safetensors`` file. What is not given is taken from the
checkpoint's ``args`` when it records it, and the SCHEME structure (groups, expansion, CCA, the MLPs a
``filter_fn`` left dense) is otherwise read off the weights, so that a checkpoint of timm's own train.py, which
knows nothing of SCHEME, rebuilds as it was.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import timm
import torch
from torch import nn

from ..config import SchemeConfig
from ..mixers import is_patched, scheme_mixers
from ..patching.patch import FilterFn, find_mlps, patch_structure
from .weights import _abbreviate, check_state_dict, read_training_checkpoint

# what timm's train script records of its preprocessing, carried into an exported pretrained_cfg
DATA_ARGS = ("input_size", "img_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")
_FIELDS = {f.name for f in dataclasses.fields(SchemeConfig)}


@dataclass
class Rebuilt:
    """The model a training checkpoint holds, and where each of its settings came from."""
    model: nn.Module
    name: str
    kwargs: Dict[str, Any]
    config: SchemeConfig
    already_fused: bool  # the weights are an inference form (no mixing logits)
    info: Dict[str, Any]  # what read_training_checkpoint says of the file
    origin: List[str] = field(default_factory=list)  # "x from the checkpoint's args", ...

    @property
    def preprocessing(self) -> Dict[str, Any]:
        """The train script's preprocessing arguments (mean, std, input size, crop, interpolation) it recorded."""
        args = self.info.get("args") or {}
        return {k: args[k] for k in DATA_ARGS if args.get(k) not in (None, "")}


def rebuild(
        path: os.PathLike,
        *,
        use_ema: bool = False,
        model_name: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        scheme_options: Optional[Dict[str, Any]] = None,
) -> Rebuilt:
    """The patched timm model a training checkpoint was trained as, with its weights loaded (strictly).

    ``model_name``, ``model_kwargs`` (``create_model`` arguments: ``num_classes``, ``img_size``, ...) and
    ``scheme_options`` (SchemeConfig fields) override what the checkpoint records or its weights imply."""
    state_dict, info = read_training_checkpoint(path, use_ema=use_ema)
    train_args = info.get("args") or {}
    origin: List[str] = []
    name = model_name or train_args.get("model")
    if not name:
        raise ValueError("--model is required (model_name in Python): the checkpoint does not record the timm model "
                         "it was trained as")
    if not timm.is_model(name):
        raise ValueError(f"--model {name!r} is not a timm model name (see timm.list_models())")
    if not model_name:
        origin.append(f"model {name!r} from the checkpoint's args")
    kwargs = _model_kwargs(name, model_kwargs or {}, train_args, state_dict, origin)
    config = SchemeConfig.from_dict(_scheme_options(scheme_options or {}, train_args, state_dict, origin))

    model = timm.create_model(name, pretrained=False, **kwargs)
    if not is_patched(model):
        patch_structure(model, config, _patched_mlps(model, state_dict, origin))
    has_logits = any(k.endswith("mix_logits") for k in state_dict)
    already_fused = not has_logits and any(m.has_cca for m in scheme_mixers(model).values())
    if already_fused:  # e.g. an earlier export: build the inference form it holds
        for mixer in scheme_mixers(model).values():
            mixer.fuse()
    check_state_dict(state_dict, model, source=str(path),
                     what=f"{name} patched with SCHEME {config.describe()}",
                     arguments_hint="--img-size, --num-classes, --in-chans and --model-kwargs KEY=VALUE")
    model.load_state_dict(state_dict, strict=True)
    return Rebuilt(model=model, name=name, kwargs=kwargs, config=config, already_fused=already_fused, info=info,
                   origin=origin)


def _model_kwargs(name: str, given: Dict[str, Any], train_args: Dict[str, Any], state_dict: Dict[str, torch.Tensor],
                  origin: List[str]) -> Dict[str, Any]:
    kwargs = dict(given)
    saved = train_args.get("model_kwargs")
    if isinstance(saved, dict) and saved and not given:
        kwargs.update(saved)
        origin.append(f"model kwargs {saved} from the checkpoint's args")
    for key in ("num_classes", "img_size", "in_chans"):
        if key not in kwargs and train_args.get(key) is not None:
            kwargs[key] = train_args[key]
            origin.append(f"{key}={train_args[key]} from the checkpoint's args")
    if "num_classes" not in kwargs:
        classes = _classes_in(name, state_dict)
        if classes is not None:
            kwargs["num_classes"] = classes
            origin.append(f"num_classes={classes} from the classifier weights")
    return kwargs


def _scheme_options(given: Dict[str, Any], train_args: Dict[str, Any], state_dict: Dict[str, torch.Tensor],
                    origin: List[str]) -> Dict[str, Any]:
    """The command line first, then the config the checkpoint recorded (``timm-scheme train``), then what the
    weights show (a checkpoint of timm's own train.py)."""
    recorded = train_args.get("scheme_config")
    if not isinstance(recorded, dict):  # older timm-scheme train checkpoints: the raw flags
        recorded = {k: v for k, v in train_args.items() if k in _FIELDS and v is not None}
        recorded.update(train_args.get("scheme_options") or {})
        if train_args.get("no_cca"):
            recorded["cca"] = False
    options = dict(given)
    for values, source in ((recorded, "the checkpoint's args"), (_structure_of(state_dict), "the weights")):
        for key, value in values.items():
            if key in _FIELDS and key not in options:
                options[key] = value
                origin.append(f"{key}={value!r} from {source}")
    return options


def _structure_of(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """groups, expansion and cca as the block-diagonal weights show them ({} if no layer is block diagonal)."""
    fc2 = {k[:-len("fc2.weight")]: v for k, v in state_dict.items() if k.endswith(".fc2.weight") and v.dim() == 3}
    fc1 = {k: state_dict.get(k + "fc1.weight") for k in fc2}
    layers = [(w1, w2) for k, w2 in fc2.items() for w1 in [fc1[k]] if w1 is not None and w1.dim() == 3]
    if not layers:
        return {}
    structure: Dict[str, Any] = {}
    groups = {w2.shape[0] for _, w2 in layers}
    if len(groups) == 1:
        structure["groups"] = groups.pop()
    ratios = {w2.shape[0] * w2.shape[2] / (w1.shape[0] * w1.shape[2]) for w1, w2 in layers}
    if len(ratios) == 1:
        structure["expansion"] = ratios.pop()
    structure["cca"] = any(k.endswith("mix_logits") for k in state_dict)
    return structure


def _patched_mlps(model: nn.Module, state_dict: Dict[str, torch.Tensor], origin: List[str]) -> Optional[FilterFn]:
    """A filter_fn for the MLPs the weights hold in SCHEME form, when a ``filter_fn`` at training left others dense
    (their weights are exactly the unpatched layer's); None when every MLP was patched, or none was (then the
    state-dict check names what does not fit)."""
    mlps = find_mlps(model)
    dense = {name for name, module in mlps if _holds_dense(state_dict, name, module)}
    if not dense or len(dense) == len(mlps):
        return None
    origin.append(f"{len(mlps) - len(dense)} of {len(mlps)} MLPs patched, as the weights show "
                  f"(dense: {_abbreviate(sorted(dense), limit=3)})")
    return lambda module, name: name not in dense


def _holds_dense(state_dict: Dict[str, torch.Tensor], name: str, module: nn.Module) -> bool:
    """Whether the weights under ``name.`` are exactly those of the unpatched ``module``: the same keys and shapes."""
    own = {f"{name}.{k}": tuple(v.shape) for k, v in module.state_dict().items()}
    held = {k: tuple(v.shape) for k, v in state_dict.items() if k.startswith(name + ".")}
    return bool(own) and held == own


def _classes_in(name: str, state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    cfg = timm.models.get_pretrained_cfg(name)
    classifier = cfg.classifier if cfg is not None else None
    for head in ([classifier] if isinstance(classifier, str) else list(classifier or [])):
        weight = state_dict.get(f"{head}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None
