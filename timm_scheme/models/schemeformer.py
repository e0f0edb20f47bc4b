"""SCHEMEformer: the paper's model family, MetaFormer PPAA (pooling, pooling, attention, attention) with
every MLP a SCHEME mixer at E = 8. Registered in timm's model registry by ``import timm_scheme``.

    import timm, timm_scheme
    model = timm.create_model("schemeformer_ppaa_s12_224", num_classes=100)
    backbone = timm.create_model("schemeformer_ppaa_s12_224", features_only=True)

Built on timm's ``MetaFormer`` (``timm/models/metaformer.py``) with PoolFormer v1 settings, as the paper's
``metaformer_ppaa_s12_224`` base: GELU MLPs with bias, layer scale 1e-5, GroupNorm (1 group) in the
pooling stages and LayerNorm in the attention stages, 7x7/4 stem, 3x3/2 downsampling, linear head.
Unlike the paper, there is no learnt 14x14 position embedding before stage 3: it fixes the input size,
which rules out other resolutions and dense-prediction backbones; the zero-padded pooling stages
already see position. No pretrained weights exist.

Depths S12 (2, 2, 6, 2), S24 (4, 4, 12, 4), S36 (6, 6, 18, 6); groups 4 in the base names, 2 and 8 in the
``_g2`` / ``_g8`` variants. Parameter and MAC counts, and how they compare with the paper's, are in
docs/schemeformer.md (``examples/schemeformer_costs.py`` regenerates them).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import GroupNorm1, LayerNorm
from timm.models import PretrainedCfg, build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models.metaformer import Attention, MetaFormer, Pooling

from ..config import SchemeConfig
from ..patching.patch import scheme_patch

__all__ = ["SchemeFormer", "ppaa_metaformer_kwargs"]

PAPER = "SCHEME: Scalable Channel Mixer for Vision Transformers"


class SchemeFormer(MetaFormer):
    """ A timm MetaFormer whose every block MLP is a SCHEME mixer (block-diagonal MLP + training-time CCA).

    Args:
        scheme_config: SCHEME options, a dict of :class:`SchemeConfig` fields (serialisable into a
            checkpoint's ``config.json``) or a ``SchemeConfig``; missing fields take the defaults of
            ``SchemeConfig`` (groups 4, expansion 8).
        **kwargs: ``MetaFormer`` arguments.
    """

    def __init__(self, scheme_config: Optional[Union[SchemeConfig, Dict[str, Any]]] = None, **kwargs):
        super().__init__(**kwargs)
        config = _as_config(scheme_config)
        # the block-diagonal projections start like the MetaFormer ones they replace (trunc-normal 0.02, zero bias)
        scheme_patch(self, **config.to_dict())


def _as_config(scheme_config: Optional[Union[SchemeConfig, Dict[str, Any]]]) -> SchemeConfig:
    if scheme_config is None:
        return SchemeConfig(cca=True)
    if isinstance(scheme_config, SchemeConfig):
        return scheme_config
    if isinstance(scheme_config, dict):
        return SchemeConfig.from_dict(scheme_config)
    raise TypeError(
        f"scheme_config={scheme_config!r}: expected a dict of SchemeConfig fields (e.g. {{'groups': 8}}) "
        "or a SchemeConfig")


def _create_schemeformer(variant: str, pretrained: bool = False, groups: int = 4, **kwargs) -> SchemeFormer:
    _check_pretrained(variant, pretrained, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    # the variant fixes groups, E = 8 and the paper's CCA branch (faded out by the patch's default schedule); a
    # scheme_config given by the caller overrides them field by field
    scheme_config = kwargs.pop("scheme_config", None)
    if isinstance(scheme_config, SchemeConfig):
        scheme_config = scheme_config.to_dict()
    scheme_config = {"groups": groups, "expansion": 8.0, "cca": True, **(scheme_config or {})}
    depths = kwargs.get("depths", (2, 2, 6, 2))
    out_indices = kwargs.pop("out_indices", tuple(range(len(depths))))
    model = build_model_with_cfg(
        SchemeFormer,
        variant,
        pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        scheme_config=scheme_config,
        **kwargs,
    )
    if not hasattr(model, "scheme_config"):  # a features_only wrapper: record the config on it too
        model.scheme_config = SchemeConfig.from_dict(scheme_config)
    return model


def _check_pretrained(variant: str, pretrained: bool, pretrained_cfg: Any, overlay: Optional[dict]) -> None:
    """No SCHEMEformer weights exist; ``pretrained=True`` only works with a source the caller supplies."""
    if not pretrained:
        return
    cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else None
    if isinstance(pretrained_cfg, PretrainedCfg):
        cfg = pretrained_cfg.to_dict()
    if cfg is None:
        default = get_pretrained_cfg(variant)
        cfg = default.to_dict() if default is not None else {}
    cfg = {**cfg, **(overlay or {})}
    if not any(cfg.get(key) for key in ("url", "file", "state_dict", "hf_hub_id")):
        raise RuntimeError(
            f"{variant}: no pretrained weights exist for SCHEMEformer models (none were released in timm's "
            "format, and timm_scheme ships none). Create it with pretrained=False and train it (see "
            "`timm-scheme train --help`), or point to your own weights, e.g. timm.create_model("
            f"'{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='model.safetensors')).")


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.9, "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "classifier": "head.fc", "first_conv": "stem.conv",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2312.00412", "paper_name": PAPER,
        "origin_url": "https://github.com/DeepakSridhar/scheme_vit",
        "notes": ("architecture only: no pretrained weights exist",),
        **kwargs,
    }


# (variant, depths, groups); E = 8 everywhere. The base names use g = 4: the BD-MLP then costs half the
# dense E = 4 MLP; g = 2 matches the dense E = 4 cost, g = 8 a quarter of it.
_VARIANTS = {
    "schemeformer_ppaa_s12_224": ((2, 2, 6, 2), 4),
    "schemeformer_ppaa_s12_g2_224": ((2, 2, 6, 2), 2),
    "schemeformer_ppaa_s12_g8_224": ((2, 2, 6, 2), 8),
    "schemeformer_ppaa_s24_224": ((4, 4, 12, 4), 4),
    "schemeformer_ppaa_s24_g2_224": ((4, 4, 12, 4), 2),
    "schemeformer_ppaa_s24_g8_224": ((4, 4, 12, 4), 8),
    "schemeformer_ppaa_s36_224": ((6, 6, 18, 6), 4),
    "schemeformer_ppaa_s36_g2_224": ((6, 6, 18, 6), 2),
    "schemeformer_ppaa_s36_g8_224": ((6, 6, 18, 6), 8),
}

default_cfgs = generate_default_cfgs({
    name: _cfg(description=f"SCHEMEformer PPAA, depths {depths}, E=8, groups={groups}")
    for name, (depths, groups) in _VARIANTS.items()
})


def ppaa_metaformer_kwargs(depths: Tuple[int, ...]) -> Dict[str, Any]:
    """timm ``MetaFormer`` arguments of the PPAA architecture at ``depths``: the family's, and, built as a plain
    ``MetaFormer`` with timm's E=4 MLPs, the dense baseline it is compared with."""
    return dict(
        depths=depths,
        dims=(64, 128, 320, 512),
        token_mixers=(Pooling, Pooling, Attention, Attention),
        norm_layers=(GroupNorm1, GroupNorm1, LayerNorm, LayerNorm),
        downsample_norm=None,
        mlp_act=nn.GELU,
        mlp_bias=True,
        layer_scale_init_values=1e-5,
        res_scale_init_values=None,
        use_mlp_head=False,
    )


def _ppaa(variant: str, pretrained: bool, **kwargs) -> SchemeFormer:
    depths, groups = _VARIANTS[variant]
    model_kwargs = {**ppaa_metaformer_kwargs(depths), **kwargs}
    return _create_schemeformer(variant, pretrained=pretrained, groups=groups, **model_kwargs)


@register_model
def schemeformer_ppaa_s12_224(pretrained: bool = False, **kwargs) -> SchemeFormer:
    """SCHEMEformer PPAA-S12: depths (2, 2, 6, 2), widths (64, 128, 320, 512), E=8, groups=4."""
    return _ppaa("schemeformer_ppaa_s12_224", pretrained, **kwargs)


@register_model
def schemeformer_ppaa_s12_g2_224(pretrained: bool = False, **kwargs) -> SchemeFormer:
    """SCHEMEformer PPAA-S12 with groups=2 (BD-MLP as costly as the dense E=4 MLP)."""
    return _ppaa("schemeformer_ppaa_s12_g2_224", pretrained, **kwargs)


@register_model
def schemeformer_ppaa_s12_g8_224(pretrained: bool = False, **kwargs) -> SchemeFormer:
    """SCHEMEformer PPAA-S12 with groups=8 (BD-MLP a quarter of the dense E=4 MLP)."""
    return _ppaa("schemeformer_ppaa_s12_g8_224", pretrained, **kwargs)


@register_model
def schemeformer_ppaa_s24_224(pretrained: bool = False, **kwargs) -> SchemeFormer:
    """SCHEMEformer PPAA-S24: depths (4, 4, 12, 4), widths (64, 128, 320, 512), E=8, groups=4."""
    return _ppaa("schemeformer_ppaa_s24_224", pretrained, **kwargs)


@register_model
def schemeformer_ppaa_s24_g2_224(pretrained: bool = False, **kwargs) -> SchemeFormer:
    """SCHEMEformer PPAA-S24 with groups=2."""
    return _ppaa("schemeformer_ppaa_s24_g2_224", pretrained, **kwargs)


@register_model
def schemeformer_ppaa_s24_g8_224(pretrained: bool = False, **kwargs) -> SchemeFormer:
    """SCHEMEformer PPAA-S24 with groups=8."""
    return _ppaa("schemeformer_ppaa_s24_g8_224", pretrained, **kwargs)


@register_model
def schemeformer_ppaa_s36_224(pretrained: bool = False, **kwargs) -> SchemeFormer:
    """SCHEMEformer PPAA-S36: depths (6, 6, 18, 6), widths (64, 128, 320, 512), E=8, groups=4."""
    return _ppaa("schemeformer_ppaa_s36_224", pretrained, **kwargs)


@register_model
def schemeformer_ppaa_s36_g2_224(pretrained: bool = False, **kwargs) -> SchemeFormer:
    """SCHEMEformer PPAA-S36 with groups=2."""
    return _ppaa("schemeformer_ppaa_s36_g2_224", pretrained, **kwargs)


@register_model
def schemeformer_ppaa_s36_g8_224(pretrained: bool = False, **kwargs) -> SchemeFormer:
    """SCHEMEformer PPAA-S36 with groups=8."""
    return _ppaa("schemeformer_ppaa_s36_g8_224", pretrained, **kwargs)
