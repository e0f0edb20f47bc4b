"""timm's FX model of a SCHEME model computes what the eager model computes, bit for bit (timm's own
``test_model_forward_fx`` asserts ``torch.all(fx == eager)``), at every thread count.

Eager CPU inference runs the tiled block-diagonal kernels, whose token tiles depend on the thread count; the
plain per-group form that tracing records sums in another order. timm's FX tracing must therefore call the
SCHEME modules as leaves (``timm_scheme.fx``), while plain ``torch.fx.symbolic_trace``, like the exporters,
still records the plain form (``tests/test_tracing.py`` checks that form at other batch sizes).

timm's own test file, from a checkout of timm's repository at PATH, as a user's CI would run it (from a folder
other than the checkout, so that the installed timm is the one imported):

    python -c "import timm_scheme, sys, pytest; sys.exit(pytest.main(['PATH/tests/test_models.py', '-k', 'schemeformer']))"
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterator

import pytest
import timm
import torch
from torch import nn

from timm_scheme import SchemeMlp, fuse_for_inference, scheme_patch
from timm_scheme.fx import LEAF_MODULES

from .models import ARCHITECTURES, create, shallow, timm_fx_model

pytestmark = pytest.mark.filterwarnings("ignore:The nodes obtained by tracing the model in train mode:UserWarning")

BATCH = 2
THREADS = (1, 2)
FORMS = ("unfused", "fused")
# blocks kept per stage: every block kind of the architecture, a fraction of the graph to trace
PATCHED = {"deit_tiny_patch16_224": 2, "swin_tiny_patch4_window7_224": (2, 1, 1, 1), "caformer_s18": 1}
# the SCHEMEformers at every group count; S24 and S36 repeat S12's modules deeper (test_timm_model_checks runs
# timm's FX checks on them)
KEYS = [*PATCHED, *timm.list_models("schemeformer_ppaa_s12*")]


def build(key: str) -> nn.Module:
    """An unfused eval model: patched (with CCA, so that fusing changes the mixers) or a SCHEMEformer."""
    torch.manual_seed(0)
    if key in PATCHED:
        return scheme_patch(shallow(create(key), PATCHED[key]), groups=4, expansion=8, cca=True).eval()
    return timm.create_model(key, pretrained=False, num_classes=10).eval()


def fused(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the CCA weight an untrained model discards
        return fuse_for_inference(model)


def image_size(key: str) -> int:
    return ARCHITECTURES[key][1] if key in PATCHED else 64  # SCHEMEformer S12: every stage at least 2x2


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=KEYS)
def traced(request):
    """{form: (eager model, timm's FX model of it)} and an input batch."""
    unfused = build(request.param)
    forms = {}
    for form, model in zip(FORMS, (unfused, fused(unfused))):
        with torch.inference_mode():  # as timm's test builds it
            forms[form] = model, timm_fx_model(model)
    size = image_size(request.param)
    return forms, torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("form", FORMS)
def test_timm_fx_model_equals_eager_bit_for_bit(traced, form, threads):
    forms, x = traced
    model, fx = forms[form]
    with num_threads(threads), torch.inference_mode():
        want = model(x)
        got = torch.cat(tuple(fx(x).values()))
    assert torch.equal(got, want), f"FX differs from eager by up to {float((got - want).abs().max()):.3e}"


def test_timm_fx_calls_the_scheme_modules_and_plain_fx_records_their_plain_form():
    """timm's tracer keeps every SCHEME mixer a call of the module itself; plain symbolic_trace (what export and
    torchvision's own feature extraction see) traces through them."""
    model = fused(build("deit_tiny_patch16_224"))
    mixers = {name for name, m in model.named_modules() if isinstance(m, SchemeMlp)}
    assert mixers
    timm_called = {n.target for n in timm_fx_model(model).graph.nodes if n.op == "call_module"}
    assert mixers <= timm_called
    plain_called = {n.target for n in torch.fx.symbolic_trace(model).graph.nodes if n.op == "call_module"}
    assert not any(isinstance(model.get_submodule(t), LEAF_MODULES) for t in plain_called)
