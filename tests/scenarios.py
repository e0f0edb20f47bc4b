"""Models, batches and training runs shared by the tests and by the scripts in examples/ that record the
measurements the tests' bounds come from (int8_digits.py, autocast_error.py, lora_block_energy.py): one
definition, so a script measures exactly what its test asserts on. Plain functions: importing this module needs
neither pytest nor the optional packages the tests use."""
from __future__ import annotations

import copy
import importlib.util
import math
from typing import Dict, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_scheme
from timm_scheme.integrations import quantize as Q
from timm_scheme.training.digits import load_digits_tensors

from .models import ARCHITECTURES, create, shallow

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None  # a dev extra


# --- tests/test_robustness.py, examples/autocast_error.py -------------------------------------------------

def patched_shallow(key: str, keep: int = 2) -> nn.Module:
    """A shallow instance of ``key`` (tests/models.py) patched with CCA, its mixing weights drawn away from 0.5,
    in training mode."""
    torch.manual_seed(0)
    model = timm_scheme.scheme_patch(shallow(create(key), keep=keep), groups=4, expansion=8, cca=True)
    with torch.no_grad():  # alpha away from its 0.5 init: CCA and BD-MLP weigh differently per layer
        for name, param in model.named_parameters():
            if name.endswith("mix_logits"):
                param.copy_(torch.randn(2))
    return model.train()


def batch(key: str, size: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    side = ARCHITECTURES[key][1]
    return torch.randn(size, 3, side, side, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def loss_and_grads(model: nn.Module, images: torch.Tensor, labels: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """Logits, cross-entropy loss and the gradients of the loss (parameters, and the input as "input").
    Seeded: Swin's stochastic depth draws the same masks in every call."""
    torch.manual_seed(2)
    images = images.detach().clone().requires_grad_()
    logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    # a torch.compile wrapper names them "_orig_mod.<name>"
    named = [(n.removeprefix("_orig_mod."), p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [images] + [p for _, p in named])
    return logits.detach(), loss.detach(), {"input": grads[0], **{n: g for (n, _), g in zip(named, grads[1:])}}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


# relative error bounds against float32 for (logits, mixer weight and input gradients, mixing-logit gradients).
# Measured on these models by examples/autocast_error.py (examples/results/autocast_error.md): bf16 0.5-1.1% /
# 0.6-1.9% / 2.5-43%, fp16 0.07-0.10% / 0.08-0.17% / 0.08-9.5%. The mixing logits' gradient is a small
# difference of large sums (BD-MLP against CCA output), so it keeps few digits in any low-precision dtype; worst
# in CAFormer's first stage, whose 1e-5 layer scale leaves a gradient that is mostly cancellation (bf16 rounds 8x
# coarser than fp16). A broken cast or a branch computed in the wrong precision lands far outside the logit and
# weight bounds.
AUTOCAST_TOLERANCE = {torch.bfloat16: (0.03, 0.06, 0.6), torch.float16: (0.005, 0.01, 0.15)}


# --- tests/test_lora.py, examples/lora_block_energy.py ------------------------------------------------------

def patched_deit(cca: bool = False, seed: int = 0) -> nn.Module:
    """A 2-block DeiT-Tiny at 32 px, patched (g=4, E=8), in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                              depth=2)
    timm_scheme.scheme_patch(model, groups=4, expansion=8, cca=cca)
    return model.eval()


# --- tests/test_quantize.py, examples/int8_digits.py -------------------------------------------------------

def fused_deit() -> nn.Module:
    """The 2-block DeiT-Tiny at 32 px, patched (g=4, E=8, no CCA) and fused: random weights."""
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                              depth=2)
    timm_scheme.scheme_patch(model, groups=4, expansion=8)
    model.eval()
    timm_scheme.fuse_for_inference(model)
    return model


# relative error of the logits (norm), random weights and inputs; measured at seeds 0-4 by examples/int8_digits.py
# (examples/results/int8_digits.md): torch.ao 3.4-4.1% (its Linear quantizes activations per tensor, 7-bit on x86),
# torchao 1.6-2.0%; block-diagonal layers alone: torch.ao (per call and group) 1.9-2.8%, torchao (per token and
# group) 1.0-1.4%
QUANTIZE_ENTRY_POINTS = {
    "torch.ao": (lambda m, **kw: Q.quantize_dynamic_int8(m, **kw), 0.08),
    "torchao": (lambda m, **kw: Q.quantize_int8(copy.deepcopy(m), **kw), 0.05),
}


def train_digits(epochs=25, seed=0):
    """A tiny SCHEME ViT with CCA trained on digits (initialisation and batch order from ``seed``), fused.
    Also run by examples/int8_digits.py, which records the accuracy int8 costs over several seeds."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_tensors(img_size=16)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=16, patch_size=4,
                              embed_dim=64, depth=2, num_heads=2)
    timm_scheme.scheme_patch(model, groups=4, expansion=8, cca=True)
    batch = 64
    steps = epochs * (len(y_train) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    # a cosine to zero: the patch's default schedule anneals CCA out with the learning rate
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y_train), generator=order)
        for i in range(len(y_train) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    timm_scheme.fuse_for_inference(model)
    return model, x_test, y_test
