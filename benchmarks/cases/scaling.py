"""Section ``scaling``: batch size and resolution, per image and per token, so linearity in tokens is visible."""
from __future__ import annotations

import gc
import math
from typing import List

import torch

from timm_scheme.layers import ChannelCovarianceAttention

from ..harness import Settings, Table, compare, ms, ratio
from .block import block_modules
from .common import C_TINY, Plan, without_grad
from .models import MODEL_LABELS, dense_model, infer_pair, scheme_model
from .training import train_step


SCALING_SIZES = ((224, 1), (224, 8), (224, 32), (224, 64), (384, 8))  # (image px, batch)
SCALING_TRAIN = ((224, 8), (384, 8))


def scaling_tables(plan: Plan, settings: Settings, name: str = "deit_tiny_patch16_224") -> List[Table]:
    """How the ratios move with batch (1 to 64) and image size (224 to 384 px), and the cost per token of the
    mixer parts (flat = linear in tokens)."""
    mixer = Table(f"Scaling, mixer parts at {MODEL_LABELS[name]} sizes (C=192, g=4, E=8), inference: cost per "
                  "token and the BD-MLP speedup", ["image px", "batch", "tokens / image", "tokens",
                                                   "dense E=4 MLP us / token", "BD-MLP (ours) us / token",
                                                   "BD-MLP speedup vs dense E=4", "CCA us / token",
                                                   "CCA / dense MLP time", "BD-MLP us / token vs 224 px b32",
                                                   "CCA us / token vs 224 px b32"])
    torch.manual_seed(0)
    dense4, _, scheme, _ = block_modules(C_TINY)
    scheme.eval()
    cca = ChannelCovarianceAttention(scheme.hidden_features ** -0.5)
    rows = []
    for img, b in SCALING_SIZES:
        n = (img // 16) ** 2 + 1
        x = torch.randn(b, n, C_TINY)
        t = compare({"dense": without_grad(lambda: dense4(x)), "ours": without_grad(lambda: scheme(x)),
                     "cca": without_grad(lambda: cca(x))}, settings)
        per_tok = {k: t[k].median / (b * n) * 1e6 for k in t}
        rows.append((img, b, n, b * n, per_tok["dense"], per_tok["ours"], ratio(t, "dense", "ours"),
                     per_tok["cca"], ratio(t, "cca", "dense")))
    ref = next(r for r in rows if r[:2] == (224, 32))
    for r in rows:
        mixer.add(*r, r[5] / ref[5], r[7] / ref[7])
    mixer.notes.append("us / token = median time per call / (batch x tokens); CCA = the channel covariance "
                       "attention forward alone (its C x C logits per sample: linear in tokens, per-token cost "
                       "flat once the batch fills the GEMMs)")

    model = Table(f"Scaling, {MODEL_LABELS[name]}: fused SCHEME (g=4, E=8) vs dense timm (E=4)",
                  ["image px", "batch", "tokens / image", "dense ms / image", "SCHEME ms / image",
                   "inference ratio (dense t / SCHEME t)", "training step: SCHEME + CCA t / dense t"])
    for img, b in SCALING_SIZES:
        t, r_inf = infer_pair(name, b, img, settings)
        r_train = math.nan
        if (img, b) in SCALING_TRAIN:
            size = {} if img == 224 else {"img_size": img}
            torch.manual_seed(0)
            steps = {"dense": train_step(dense_model(name, **size), b, img),
                     "scheme": train_step(scheme_model(name, **size), b, img)}
            r_train = 1.0 / ratio(compare(steps, settings), "dense", "scheme")
            del steps
        model.add(img, b, (img // 16) ** 2 + 1, ms(t["dense"]) / b, ms(t["scheme"]) / b, r_inf, r_train)
        gc.collect()
    model.notes.append("inference target at 224 px, batch 32: >= 1.3x; training target: <= 1.0x")
    return [mixer, model]
