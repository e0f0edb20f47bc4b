"""Find the channel-mixer MLPs of a timm model and swap them for SCHEME mixers, in place: which MLPs (not heads,
token-mixing MLPs or attention internals) and how the new mixers start. timm.layers' MLP classes are read through
``timm_mlps``, the others through their adapters (``adapters``); nothing here knows about files.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, List, Optional, Tuple

from torch import nn

from ..config import SchemeConfig
from ..conversion.adapted import init_adapted_from_dense
from ..conversion.convert import CalibrationData, InitReport, init_from_dense
from ..layers import SchemeMlp
from ..mixers import is_patched
from .adapters import AdaptedLayout, adapter_for, build_adapted, mlp_adapters, read_adapted
from .host_init import draw_layer_like
from .timm_mlps import SUPPORTED_MLP_TYPES, MlpLayout, is_timm_mlp, read_mlp

_logger = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]
# timm modules that are MLPs over tokens, not channels (MLP-Mixer's token-mixing MLP)
TOKEN_MIXER_NAMES = ("mlp_tokens",)
# an MLP inside one of these is part of an attention or position-bias computation (e.g. Swin-V2-CR's
# meta_mlp over 2-D offsets), not a block's channel mixer
NON_MIXER_PARENTS = ("Attention", "Attn", "PosMlp", "PosBias")


def scheme_patch(
        model: nn.Module,
        groups: int = 4,
        expansion: Optional[float] = 8,
        *,
        filter_fn: Optional[FilterFn] = None,
        calibration_data: Optional[CalibrationData] = None,
        **options: Any,
) -> nn.Module:
    """Replace every channel-mixer MLP of a timm model with a SCHEME mixer, in place; returns the model.

    Args:
        model: a timm model (classifier, ``features_only`` or any module holding timm MLPs).
        groups: channel groups of the block-diagonal projections.
        expansion: hidden units per input channel; ``None`` keeps each layer's width.
        filter_fn: ``filter_fn(module, name) -> bool`` narrows which MLPs are replaced.
        calibration_data: with ``init="dense"``, images (a tensor, or an iterable of batches or
            ``(images, targets)`` pairs) on which each layer's output error picks the hidden-unit assignment;
            without it the assignment keeps the most weight energy.
        **options: any other field of :class:`SchemeConfig`, e.g. ``cca=True`` or ``init="dense"``.

    The new block-diagonal projections are drawn with the mean and spread of the projections they replace
    (``init="random"``), or converted from them (``init="dense"``, whose report is kept on
    ``model.scheme_init_report``). CCA is off unless ``cca=True``; then the mixers drive it out by the end of
    training themselves, by ``SchemeConfig.cca_anneal``.
    """
    config = SchemeConfig.from_options(groups=groups, expansion=expansion, **options)
    if calibration_data is not None and config.init != "dense":
        raise ValueError(f"scheme_patch: calibration_data is used by init='dense' only (got init={config.init!r})")
    if is_patched(model):
        raise ValueError(
            f"scheme_patch: {type(model).__name__} is already patched "
            f"(config {getattr(model, 'scheme_config', None)}); patch a fresh model instead")
    targets = find_mlps(model, filter_fn)
    if not targets:
        raise ValueError(
            f"scheme_patch: found no MLP to patch in {type(model).__name__}; supported types are "
            f"{[t.__name__ for t in SUPPORTED_MLP_TYPES]} from timm.layers and the classes with an adapter "
            f"({len(mlp_adapters())} registered; timm_scheme.register_mlp_adapter teaches it yours). Classifier "
            "heads and MLPs rejected by filter_fn are skipped")
    # validate everything before changing anything, so a bad option leaves the model as it was
    specs = [_read(name, module) for name, module in targets]
    _check_adapted_options(specs, config)
    plans, skipped = [], {}
    for spec in specs:
        hidden = _hidden_width(spec, config)
        try:
            _check_widths(spec, hidden, config.groups, config.channel_shuffle)
        except ValueError as error:
            if not config.skip_unfit:
                raise ValueError(f"{error}; or skip_unfit=True to leave such layers dense") from None
            skipped[spec.name] = str(error).replace("scheme_patch: ", "", 1)
            continue
        plans.append((spec, hidden))
    if not plans:
        raise ValueError(f"scheme_patch: groups={config.groups} fits none of the {len(specs)} MLPs of "
                         f"{type(model).__name__}: {next(iter(skipped.values()))}")
    targets = [(name, module) for name, module in targets if name not in skipped]
    replacements = [(spec.name, _build(spec, hidden, config)) for spec, hidden in plans]
    init_report = None
    if config.init == "dense":  # reads the dense MLPs (and may run the model), so before any replacement
        init_report = _init_from_dense(model, plans, replacements, config, calibration_data)

    for name, new in replacements:
        _set_submodule(model, name, new)
    without_cca = [name for name, new in replacements if config.cca and not new.has_cca]
    if without_cca:
        _logger.warning("SCHEME: CCA needs equal in/out widths; these layers run without it: %s", without_cca)
    model.scheme_config = config
    if config.skip_unfit:
        model.scheme_skipped = skipped
    if skipped:
        _logger.warning("SCHEME: left %d of %d MLPs dense (skip_unfit=True): %s", len(skipped), len(specs),
                        "; ".join(f"{name}: {why}" for name, why in skipped.items()))
    if init_report is not None:
        model.scheme_init_report = init_report
        _logger.info("SCHEME init='dense': %s", init_report.summary())
    _logger.debug("SCHEME: replaced %d MLPs (groups=%d, expansion=%s)", len(replacements), config.groups,
                 config.expansion)
    return model


def patch_structure(model: nn.Module, config: SchemeConfig, filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Patch with ``config``'s structure only, for weights about to be loaded (no conversion of the
    model's current weights); the model records ``config`` itself."""
    scheme_patch(model, filter_fn=filter_fn, **{**config.to_dict(), "init": "random"})
    model.scheme_config = config
    return model


def _read(name: str, module: nn.Module):
    adapter = adapter_for(module, name)
    return read_mlp(name, module) if adapter is None else read_adapted(name, module, adapter)


def _check_adapted_options(specs: list, config: SchemeConfig) -> None:
    adapted = [s for s in specs if isinstance(s, AdaptedLayout)]
    if not adapted:
        return
    where = f"layer '{adapted[0].name}' ({type(adapted[0].module).__name__}, read through an adapter)"
    if config.channel_shuffle:
        raise ValueError(f"scheme_patch: channel_shuffle needs timm.layers' MLP classes, not {where}; patch without "
                         "it, or filter_fn to leave such layers out")


def _init_from_dense(model: nn.Module, plans: list, replacements: list, config: SchemeConfig,
                     calibration_data: Optional[CalibrationData]) -> InitReport:
    """timm's MLPs through ``conversion.init_from_dense`` (calibrated when given images), adapted ones through
    ``conversion.init_adapted_from_dense`` (weight energy)."""
    specs = {spec.name: spec for spec, _ in plans}
    timm_layers = [(name, specs[name].module, new) for name, new in replacements
                   if not isinstance(specs[name], AdaptedLayout)]
    adapted = [(specs[name], new) for name, new in replacements if isinstance(specs[name], AdaptedLayout)]
    report = init_from_dense(model, timm_layers, config.groups, calibration_data) if timm_layers else InitReport()
    if adapted and calibration_data is not None:
        _logger.warning("SCHEME init='dense': layers read through an adapter keep the weight-energy assignment, "
                        "without calibration: %s", [spec.name for spec, _ in adapted][:4])
    for spec, new in adapted:
        report.layers[spec.name] = init_adapted_from_dense(spec, new)
    return report


def find_mlps(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs ``scheme_patch`` would replace: timm.layers' MLPs and the classes with an
    adapter (``register_mlp_adapter``)."""
    head_prefixes = _classifier_prefixes(model)
    excluded_prefixes = [n for n, m in model.named_modules() if n and _is_non_mixer_parent(type(m).__name__)]
    found = []
    for name, module in model.named_modules():
        if not (is_timm_mlp(module) or adapter_for(module, name) is not None) \
                or name.rpartition(".")[2] in TOKEN_MIXER_NAMES:
            continue
        if any(name.startswith(p + ".") for p in excluded_prefixes):
            continue
        if not name:
            raise ValueError(
                f"scheme_patch: the model itself is a {type(module).__name__}; scheme_patch replaces MLPs "
                "inside a model in place. Build a timm_scheme.SchemeMlp directly instead")
        if any(name == p or name.startswith(p + ".") for p in head_prefixes):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        found.append((name, module))
    return found


def _is_non_mixer_parent(class_name: str) -> bool:
    return class_name.endswith(NON_MIXER_PARENTS) and "Block" not in class_name


def _classifier_prefixes(model: nn.Module) -> List[str]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    classifier = cfg.get("classifier") if isinstance(cfg, dict) else None
    names = [classifier] if isinstance(classifier, str) else list(classifier or [])
    # the top-level module holding the classifier (e.g. 'head' for 'head.fc') is head, not trunk
    return sorted({n.split(".")[0] for n in names} | {"head"})


def _hidden_width(spec: MlpLayout, config: SchemeConfig) -> int:
    if config.expansion is None:
        return spec.hidden_features
    return int(round(config.expansion * spec.in_features))


def _check_widths(spec: MlpLayout, hidden: int, groups: int, shuffle: bool = False) -> None:
    where = f"layer '{spec.name}' (in_features={spec.in_features}, out_features={spec.out_features})"
    bad = [(n, w) for n, w in (("in_features", spec.in_features), ("out_features", spec.out_features)) if w % groups]
    if bad:
        fitting = _divisors_of_all(spec.in_features, spec.out_features)
        raise ValueError(
            f"scheme_patch: groups={groups} does not divide {bad[0][0]}={bad[0][1]} of {where}; "
            f"groups that divide this layer's widths: {fitting}")
    if hidden < groups or hidden % groups:
        ok = _expansions_giving_multiples(spec, groups)
        raise ValueError(
            f"scheme_patch: the hidden width {hidden} of {where} (from its expansion) is not a positive multiple "
            f"of groups={groups}; choose an expansion giving a multiple of {groups} hidden units "
            f"(e.g. {ok[:4]}) or expansion=None to keep {spec.hidden_features}")
    if shuffle and hidden % (groups * groups):
        ok = _expansions_giving_multiples(spec, groups * groups)
        raise ValueError(
            f"scheme_patch: channel_shuffle needs the hidden width {hidden} of {where} to be a multiple of "
            f"groups**2={groups * groups}; choose an expansion giving one (e.g. {ok[:4]}) or fewer groups")


def _expansions_giving_multiples(spec: MlpLayout, unit: int) -> List[int]:
    """Common expansions whose hidden width for this layer is a multiple of ``unit``."""
    return [e for e in (2, 3, 4, 6, 8, 12, 16) if int(round(e * spec.in_features)) % unit == 0]


def _divisors_of_all(*widths: int) -> List[int]:
    return [d for d in range(1, min(widths) + 1) if all(w % d == 0 for w in widths)][:8]


def _build(spec, hidden: int, config: SchemeConfig) -> SchemeMlp:
    if isinstance(spec, AdaptedLayout):
        return build_adapted(spec, hidden, config)
    use_cca = config.cca and spec.in_features == spec.out_features
    new = SchemeMlp(
        spec.in_features, hidden, spec.out_features,
        act_layer=nn.Identity,
        bias=spec.bias,
        drop=spec.drop,
        use_conv=spec.use_conv,
        groups=config.groups,
        gated=spec.gated,
        gate_last=spec.gate_last,
        norm_first=spec.norm_first,
        cca=use_cca,
        cca_scale=config.cca_scale(hidden),
        cca_normalize=config.cca_scale_mode == "normalized",
        cca_form=config.cca_form,
        alpha_init=config.alpha_init,
        cca_schedule=config.schedule(),
        channel_shuffle=config.channel_shuffle,
        device=spec.device,
        dtype=spec.dtype,
    )
    # a drop-in replacement starts like the layer it replaces (host_init)
    draw_layer_like(new.fc1, spec.fc1)
    draw_layer_like(new.fc2, [spec.fc2])
    new.act = copy.deepcopy(spec.act)  # keeps learnable activations (e.g. StarReLU's scale and bias)
    new.norm = _resized_norm(spec, hidden)
    new.cca_skip_threshold = config.cca_skip_threshold
    new.train(spec.act.training)
    return new


def _resized_norm(spec: MlpLayout, hidden: int) -> nn.Module:
    norm = spec.norm
    if isinstance(norm, nn.Identity) or hidden == spec.hidden_features:
        return copy.deepcopy(norm)
    if isinstance(norm, nn.LayerNorm):
        new = type(norm)(hidden, norm.eps, norm.elementwise_affine)
    elif isinstance(norm, nn.modules.batchnorm._BatchNorm):
        new = type(norm)(hidden, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
    elif isinstance(norm, nn.GroupNorm):
        new = type(norm)(norm.num_groups, hidden, norm.eps, norm.affine)
    else:
        raise ValueError(
            f"scheme_patch: layer '{spec.name}' has a hidden norm {type(norm).__name__} of width "
            f"{spec.hidden_features} that cannot be resized to {hidden}; use expansion=None to keep the width")
    return new.to(device=spec.device, dtype=spec.dtype)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
