"""Section ``quantized``: int8 inference (torch.ao and torchao routes), SCHEME against dense quantized alike."""
from __future__ import annotations

import importlib.util
import warnings
from typing import Tuple

import torch
from torch import nn

from ..harness import Settings, Table, compare, ms, ratio
from .common import Plan, without_grad
from .models import MODEL_LABELS, dense_model, fused, scheme_model


def _int8_pair(name: str, mechanism: str) -> Tuple[nn.Module, nn.Module]:
    """(dense, fused SCHEME) DeiT-Tiny quantized alike: "torchao" (Int8DynamicActivationInt8WeightConfig on the
    nn.Linear layers, ours on the block-diagonal ones) or "torch.ao" (quantize_dynamic: fbgemm's dynamic Linear,
    and per group on the block-diagonal ones)."""
    from timm_scheme.integrations.quantize import quantize_dynamic_int8, quantize_int8
    torch.manual_seed(0)
    dense = dense_model(name).eval()
    scheme = fused(scheme_model(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        if mechanism == "torchao":
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
            quantize_(dense, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
            return dense, quantize_int8(scheme)
        from torch.ao.quantization import quantize_dynamic
        return quantize_dynamic(dense, {nn.Linear}, dtype=torch.qint8), quantize_dynamic_int8(scheme)


def quantized_table(plan: Plan, settings: Settings, name: str = "deit_tiny_patch16_224") -> Table:
    """Whole-model inference in fp32 and int8 (dynamic activation quantization), dense against fused SCHEME."""
    b = plan.batch
    table = Table(f"Whole model, int8 inference, batch {b}, 224 px: {MODEL_LABELS[name]} dense (E=4) vs fused "
                  "SCHEME (g=4, E=8), each quantized alike", ["precision", "dense ms", "SCHEME ms",
                                                               "dense / SCHEME (throughput ratio)",
                                                               "dense: speedup over fp32", "SCHEME: speedup over fp32"])
    torch.manual_seed(0)
    x = torch.randn(b, 3, 224, 224)
    models = {"fp32": (dense_model(name).eval(), fused(scheme_model(name)))}
    if importlib.util.find_spec("torchao") is not None:  # a dev extra
        models["int8, torchao"] = _int8_pair(name, "torchao")
    models["int8, torch.ao"] = _int8_pair(name, "torch.ao")
    fns = {}
    for label, (dense, scheme) in models.items():
        fns[f"dense {label}"] = without_grad(lambda m=dense: m(x))
        fns[f"scheme {label}"] = without_grad(lambda m=scheme: m(x))
    # our int8 layers alone: SCHEME's block-diagonal layers int8, every nn.Linear fp32, against fp32 dense
    from timm_scheme.integrations.quantize import quantize_dynamic_int8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bd_only = quantize_dynamic_int8(fused(scheme_model(name)), linear=False, inplace=True)
    fns["scheme bd-only"] = without_grad(lambda: bd_only(x))
    t = compare(fns, settings)
    for label in models:
        d, s = f"dense {label}", f"scheme {label}"
        table.add(label, ms(t[d]), ms(t[s]), ratio(t, d, s), ratio(t, "dense fp32", d), ratio(t, "scheme fp32", s))
    table.add("SCHEME: block-diagonal layers int8, nn.Linear fp32 (dense: fp32)", ms(t["dense fp32"]),
              ms(t["scheme bd-only"]), ratio(t, "dense fp32", "scheme bd-only"), 1.0,
              ratio(t, "scheme fp32", "scheme bd-only"))
    table.notes.append("target: dense / SCHEME >= 1.3x in int8 (the float ratio is on the fp32 row)")
    table.notes.append("int8, torchao: torchao's Int8DynamicActivationInt8WeightConfig on every nn.Linear of both "
                       "models (int8 weights per channel, activations per token), timm_scheme.integrations.quantize.quantize_int8 "
                       "adding the block-diagonal layers (int8 weights per group and channel, activations per "
                       "token and group, torch._int_mm per group)")
    table.notes.append("int8, torch.ao: torch.ao.quantization.quantize_dynamic on every nn.Linear of both models "
                       "(fbgemm/onednn, per-tensor activation scales), quantize_dynamic_int8 adding the "
                       "block-diagonal layers (the same int8 weights, torch.ao's dynamic Linear op per group)")
    table.notes.append("last row: the block-diagonal layers alone int8 (quantize_dynamic_int8, linear=False), "
                       "every nn.Linear fp32, against the fp32 dense model")
    table.notes.append("patch embedding, attention matmuls, norms and GELU stay fp32 in every row")
    return table
