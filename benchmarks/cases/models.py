"""Section ``models``: whole-model inference, fused SCHEME against the dense timm model; and the model builders
the other sections share."""
from __future__ import annotations

import gc
import warnings
from typing import Dict, Tuple

import torch
from torch import nn

import timm
import timm_scheme
from timm_scheme.models.schemeformer import ppaa_metaformer_kwargs

from ..harness import Settings, Table, compare, ratio
from .common import Plan, without_grad


MODEL_LABELS = {
    "deit_tiny_patch16_224": "DeiT-Tiny",
    "swin_tiny_patch4_window7_224": "Swin-T",
    "caformer_s18": "CAFormer-S18",
    "poolformer_s12": "PoolFormer-S12",
    "schemeformer_ppaa_s12_224": "SCHEMEformer PPAA-S12 (vs dense PPAA-S12, E=4)",
}


def dense_model(name: str, **kwargs) -> nn.Module:
    if name.startswith("schemeformer_ppaa_s12"):
        return _dense_ppaa_s12(**kwargs)
    return timm.create_model(name, **kwargs)


def _dense_ppaa_s12(**kwargs) -> nn.Module:
    """The SCHEMEformer's architecture with timm's dense MLPs (MetaFormer fixes E=4): its baseline."""
    from timm.models.metaformer import MetaFormer
    return MetaFormer(**ppaa_metaformer_kwargs((2, 2, 6, 2)), **kwargs)


def scheme_model(name: str, cca: bool = True, **kwargs) -> nn.Module:
    if name.startswith("schemeformer"):
        return timm.create_model(name, scheme_config={"cca": cca}, **kwargs)
    return timm_scheme.scheme_patch(timm.create_model(name, **kwargs), groups=4, expansion=8, cca=cca)


def fused(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timm_scheme.fuse_for_inference(model)
    return model.eval()


def infer_pair(name: str, batch: int, img: int, settings: Settings, **kwargs) -> Tuple[Dict, float]:
    torch.manual_seed(0)
    size = {} if img == 224 else {"img_size": img}
    dense = dense_model(name, **size, **kwargs).eval()
    scheme = fused(scheme_model(name, **size, **kwargs))
    x = torch.randn(batch, 3, img, img)
    t = compare({"dense": without_grad(lambda: dense(x)), "scheme": without_grad(lambda: scheme(x))}, settings)
    return t, ratio(t, "dense", "scheme")


def model_table(plan: Plan, settings: Settings) -> Table:
    table = Table(f"Whole model, inference, batch {plan.batch}, 224 px, fp32: fused SCHEME (g=4, E=8) vs dense "
                  "timm model (E=4)", ["model", "dense img/s", "SCHEME img/s", "throughput ratio"])
    for name in plan.model_names:
        t, r = infer_pair(name, plan.batch, 224, settings)
        table.add(MODEL_LABELS.get(name, name), plan.batch / t["dense"].median, plan.batch / t["scheme"].median, r)
        gc.collect()
    table.notes.append("target for DeiT-Tiny: >= 1.3x (the MAC count allows about 1.4x)")
    return table
