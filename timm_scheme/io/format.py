"""What a saved SCHEME checkpoint records about its model, and how that is read back.

A checkpoint is timm's own Hub layout (``config.json`` + ``model.safetensors`` + ``README.md``). Its
``config.json`` names :data:`ENTRYPOINT` as the architecture and carries a :class:`CheckpointSpec` in
``model_args["scheme"]``; timm passes ``model_args`` to that registered entry point, which rebuilds
the base model, patches it and (if the weights are fused) fuses it before loading the weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import timm
from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet, FeatureListNet
from torch import nn

from ..config import SchemeConfig
from ..mixers import scheme_mixers
from ..patching.patch import find_mlps

# Bump when a reader of the previous version would misread a new checkpoint.
FORMAT_VERSION = 2  # 2: unfused mixers carry their annealing clock (cca_step); the CCA schedule options
# the timm registry name written as config.json's "architecture". timm, asked for a checkpoint whose architecture
# is not registered, says only "Unknown model (<architecture>)": the name itself tells what to do
ENTRYPOINT = "scheme_patched__import_timm_scheme_first"
ENTRYPOINTS = (ENTRYPOINT, "scheme_patched")  # and the name checkpoints of format 1 were written with
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
_FEATURE_WRAPPERS = (FeatureListNet, FeatureDictNet, FeatureHookNet, FeatureGetterNet)


class CheckpointFormatError(ValueError):
    """A checkpoint's config or weights cannot be read as a SCHEME model."""


@dataclass(frozen=True)
class CheckpointSpec:
    """The SCHEME part of ``config.json``: enough to rebuild the module tree the weights belong to.

    Attributes:
        base_architecture: the timm model that was patched (e.g. ``"deit_tiny_patch16_224"``).
        config: the options it was patched with.
        fused: ``True`` for the inference form (no CCA, alpha folded into fc2), ``False`` for the training form.
        modules: the patched MLPs, recorded only when a ``filter_fn`` left other MLPs dense.
        format_version: the layout version of the checkpoint.
    """
    base_architecture: str
    config: SchemeConfig
    fused: bool
    modules: Optional[Tuple[str, ...]] = None
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> Dict[str, Any]:
        values = {
            "format_version": self.format_version,
            "base_architecture": self.base_architecture,
            "fused": self.fused,
            "config": self.config.to_dict(),
        }
        if self.modules is not None:
            values["modules"] = list(self.modules)
        return values

    @classmethod
    def from_dict(cls, values: Any, *, source: str = CONFIG_NAME) -> "CheckpointSpec":
        """Validate ``model_args["scheme"]`` of a checkpoint; ``source`` names it in errors."""
        where = f"{source}: model_args['scheme']"
        if not isinstance(values, Mapping):
            raise CheckpointFormatError(
                f"{where} must be a JSON object written by timm_scheme.save_pretrained, got {type(values).__name__}")
        version = values.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise CheckpointFormatError(
                f"{where} has no integer 'format_version' (got {version!r}); it was not written by "
                "timm_scheme.save_pretrained")
        if version > FORMAT_VERSION:
            from ..version import __version__
            raise CheckpointFormatError(
                f"{where}: format_version {version} is newer than this timm-scheme ({__version__}) can read "
                f"(up to {FORMAT_VERSION}); upgrade it: pip install -U timm-scheme")
        if version < 1:
            raise CheckpointFormatError(f"{where}: unknown format_version {version}; known versions: 1..{FORMAT_VERSION}")
        unknown = sorted(set(values) - {"format_version", "base_architecture", "fused", "config", "modules"})
        if unknown:
            raise CheckpointFormatError(f"{where} has unknown field(s) {unknown} for format_version {version}")
        base = values.get("base_architecture")
        if not isinstance(base, str) or not timm.is_model(base):
            raise CheckpointFormatError(
                f"{where}: base_architecture={base!r} is not a model registered with timm {timm.__version__} "
                "(see timm.list_models()); a newer timm may have it")
        fused = values.get("fused")
        if not isinstance(fused, bool):
            raise CheckpointFormatError(f"{where}: 'fused' must be true or false, got {fused!r}")
        try:
            config = SchemeConfig.from_dict(values.get("config") or {})
        except (TypeError, ValueError) as e:
            raise CheckpointFormatError(f"{where}['config']: {e}") from e
        modules = values.get("modules")
        if modules is not None:
            if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
                raise CheckpointFormatError(f"{where}: 'modules' must be a list of module names, got {modules!r}")
            modules = tuple(modules)
        return cls(base_architecture=base, config=config, fused=fused, modules=modules, format_version=version)


def spec_of(model: nn.Module, base_architecture: Optional[str] = None) -> CheckpointSpec:
    """Describe a patched timm model for saving. ``base_architecture`` overrides the recorded one."""
    config = getattr(model, "scheme_config", None)
    if not isinstance(config, SchemeConfig):
        raise ValueError(
            f"{type(model).__name__} is not a SCHEME model (no scheme_config); patch it first with "
            "timm_scheme.scheme_patch(model, ...), or save a plain timm model with timm's own save_for_hf")
    if isinstance(model, _FEATURE_WRAPPERS):
        raise ValueError(
            f"{type(model).__name__} is a features_only wrapper; save the classifier model it was built from "
            "(features_only=True can be asked for again when loading)")
    base = base_architecture or _recorded_base(model)
    if not timm.is_model(base):
        raise ValueError(f"base_architecture={base!r} is not a model registered with timm (see timm.list_models())")

    mixers = scheme_mixers(model)
    wrapped = [name for name, m in mixers.items() if not m.plain_projections()]
    if wrapped:
        raise ValueError(
            f"{wrapped[0]}{f' and {len(wrapped) - 1} more' if len(wrapped) > 1 else ''}: fc1/fc2 are wrapped "
            f"({type(mixers[wrapped[0]].fc2).__name__}), e.g. by LoRA adapters; merge them into the weights first "
            "(peft_model.merge_and_unload()), or save the adapters with PEFT's own save_pretrained")
    with_cca = [name for name, m in mixers.items() if m.has_cca]
    fused = not with_cca
    if not fused:
        expected = [name for name, m in mixers.items() if config.cca and _cca_possible(m)]
        partly = sorted(set(expected) - set(with_cca))
        if partly:
            raise ValueError(
                f"the model is partly fused: {partly[:4]}{' ...' if len(partly) > 4 else ''} lost their CCA branch "
                f"while {with_cca[:2]} kept it; call timm_scheme.fuse_for_inference(model) to fuse all layers "
                "before saving")
    # MLPs still dense after patching were left out by a filter_fn: record which ones were patched
    modules = tuple(mixers) if find_mlps(model) else None
    return CheckpointSpec(base_architecture=base, config=config, fused=fused, modules=modules)


def _cca_possible(mixer: nn.Module) -> bool:
    return mixer.fc1.in_features == mixer.fc2.out_features


def _recorded_base(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    arch = cfg.get("architecture")
    if arch in ENTRYPOINTS:
        # loaded from a SCHEME checkpoint: the factory kept the spec it was rebuilt from
        for args in (getattr(model, "_model_args", None), getattr(model, "pretrained_model_args", None)):
            scheme = (args or {}).get("scheme")
            if isinstance(scheme, Mapping) and isinstance(scheme.get("base_architecture"), str):
                return scheme["base_architecture"]
    if isinstance(arch, str) and arch and arch not in ENTRYPOINTS:
        return arch
    raise ValueError(
        f"cannot tell which timm architecture this {type(model).__name__} was built from (its pretrained_cfg has "
        "no 'architecture'); pass base_architecture='...' (the name given to timm.create_model)")
