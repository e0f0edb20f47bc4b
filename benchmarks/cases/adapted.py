"""Section ``adapted``: families read through adapters, fused SCHEME against dense."""
from __future__ import annotations

import gc

import torch

import timm_scheme

from ..harness import Settings, Table, compare, ms, ratio
from .common import Plan, without_grad
from .models import dense_model, fused, scheme_model


def adapted_table(plan: Plan, settings: Settings) -> Table:
    """Whole-model inference of families with their own MLP class: dense against fused SCHEME (g=4, E=8) with
    the fused kernels (the adapter's declared structure, BatchNorms folded) and with the family's forward run
    layer by layer."""
    b = plan.batch
    table = Table(f"Families read through adapters, inference, batch {b}, 224 px: dense (their E) vs fused SCHEME "
                  "(g=4, E=8)", ["model", "dense ms", "SCHEME ms (fused kernels)", "SCHEME ms (layer by layer)",
                                 "dense / SCHEME", "layer by layer / fused kernels"])
    for name in plan.adapted_models:
        torch.manual_seed(0)
        x = torch.randn(b, 3, 224, 224)
        dense = dense_model(name).eval()
        scheme = fused(scheme_model(name))
        layered = fused(scheme_model(name))
        for mixer in timm_scheme.scheme_mixers(layered).values():
            mixer.kernel_plan = None  # the family's own forward, each projection its own block-diagonal layer
        t = compare({"dense": without_grad(lambda: dense(x)), "scheme": without_grad(lambda: scheme(x)),
                     "layered": without_grad(lambda: layered(x))}, settings)
        table.add(name, ms(t["dense"]), ms(t["scheme"]), ms(t["layered"]), ratio(t, "dense", "scheme"),
                  ratio(t, "layered", "scheme"))
        gc.collect()
    table.notes.append("fused kernels: SCHEME's token-tiled block-diagonal MLP kernel, the hidden and output "
                       "BatchNorms folded into the projections (LeViT, EfficientViT-MSRA), or the input norm first "
                       "(TinyViT); layer by layer: the family's forward with block-diagonal projections")
    return table
