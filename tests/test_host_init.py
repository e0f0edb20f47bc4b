"""A drop-in replacement starts like the layer it replaces: every family's new block-diagonal projections are drawn
with the mean and spread of the dense projections they replace (timm's own init: trunc-normal std 0.02, zero
biases), measured on the dense model before patching."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.layers.mlp import SwiGLU

from timm_scheme import scheme_mixers, scheme_patch

from .models import ARCHITECTURES, create

pytestmark = pytest.mark.usefixtures("one_thread")


def projections(mlp):
    """(fc1 weights, fc1 biases, fc2 weight, fc2 bias) of a timm MLP, SwiGLU's two fc1 halves together."""
    fc1 = [mlp.fc1_g, mlp.fc1_x] if isinstance(mlp, SwiGLU) else [mlp.fc1]
    weights = torch.cat([f.weight.detach().reshape(-1) for f in fc1])
    biases = [f.bias.detach().reshape(-1) for f in fc1 if f.bias is not None]
    return weights, torch.cat(biases) if biases else None, mlp.fc2.weight.detach().reshape(-1), mlp.fc2.bias


def assert_drawn_alike(new: torch.Tensor, old: torch.Tensor, where: str) -> None:
    # thousands of draws: the sample std lands within a few % of the target; nn.Linear's default rule (what the
    # layers drew before) is 1.5-4x off at these widths
    assert new.std().item() == pytest.approx(old.std().item(), rel=0.08), where
    assert abs(new.mean().item() - old.mean().item()) < 0.1 * old.std().item(), where


@pytest.mark.parametrize("key", list(ARCHITECTURES))
def test_new_projections_follow_the_replaced_ones(key):
    torch.manual_seed(0)
    model = create(key)
    dense = {name: projections(m) for name, m in model.named_modules() if type(m).__name__ in
             ("Mlp", "GluMlp", "SwiGLU", "ConvMlp") and "head" not in name}
    scheme_patch(model, groups=4, expansion=8)
    mixers = scheme_mixers(model)
    assert set(mixers) <= set(dense) and mixers
    for name, mixer in mixers.items():
        w1, b1, w2, b2 = dense[name]
        assert_drawn_alike(mixer.fc1.weight.detach(), w1, f"{name}.fc1")
        assert_drawn_alike(mixer.fc2.weight.detach(), w2, f"{name}.fc2")
        for new, old in ((mixer.fc1.bias, b1), (mixer.fc2.bias, b2)):
            assert (new is None) == (old is None)
            if old is not None and torch.count_nonzero(old) == 0:
                assert torch.count_nonzero(new) == 0, f"{name}: zero biases stay zero"


def test_schemeformer_projections_start_like_metaformer_ones():
    torch.manual_seed(0)
    model = timm.create_model("schemeformer_ppaa_s12_224")
    for name, mixer in scheme_mixers(model).items():
        for layer in (mixer.fc1, mixer.fc2):
            assert layer.weight.std().item() == pytest.approx(0.02, rel=0.08), name
            assert torch.count_nonzero(layer.bias) == 0, name


def test_pretrained_like_weights_set_the_scale():
    """A layer trained to a larger spread (as pretrained weights are) passes its own spread on, not 0.02."""
    torch.manual_seed(0)
    model = create("deit_tiny_patch16_224")
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc1.weight.normal_(0.0, 0.07)
            block.mlp.fc1.bias.normal_(0.1, 0.03)
    scheme_patch(model, groups=4, expansion=8)
    for mixer in scheme_mixers(model).values():
        assert mixer.fc1.weight.std().item() == pytest.approx(0.07, rel=0.08)
        assert mixer.fc1.bias.mean().item() == pytest.approx(0.1, abs=0.01)
        assert mixer.fc1.bias.std().item() == pytest.approx(0.03, rel=0.3)
