"""The eager forms the dispatch runs on accelerators (batched GEMMs, torch._grouped_mm, per group), reached on
the CPU through ``dispatch.cpu_as_accelerator``: outputs and gradients against a float64 dense re-computation, the
choice of form and its fallbacks, and bad choices refused."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import timm_scheme.kernels.block_diagonal as bd
import timm_scheme.kernels.mlp as bd_mlp
from timm_scheme import SchemeMlp
from timm_scheme.kernels import dispatch

from .test_channel_shuffle import reference

LAYOUTS = [dict(), dict(gated=True), dict(use_conv=True), dict(channel_shuffle=True),
           dict(gated=True, channel_shuffle=True, use_conv=True)]


@pytest.fixture
def form(request):
    chosen = dispatch.accelerator_kernel()
    dispatch.set_accelerator_kernel(request.param)
    with dispatch.cpu_as_accelerator():
        yield request.param
    dispatch.set_accelerator_kernel(chosen)


def make(**layout) -> SchemeMlp:
    torch.manual_seed(0)
    mixer = SchemeMlp(16, 64, groups=4, cca=False, **layout)
    with torch.no_grad():
        mixer.fc1.bias.normal_(0, 0.5)
        mixer.fc2.bias.normal_(0, 0.5)
    return mixer


def inputs(mixer: SchemeMlp) -> torch.Tensor:
    return torch.randn(2, 16, 3, 5) if mixer.use_conv else torch.randn(2, 9, 16)


@pytest.mark.parametrize("form", dispatch.ACCELERATOR_KERNELS, indirect=True)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(d) or "plain")
def test_inference_matches_a_dense_recomputation(form, layout):
    mixer = make(**layout).eval()
    x = inputs(mixer)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x).double(), reference(mixer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", dispatch.ACCELERATOR_KERNELS, indirect=True)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(d) or "plain")
def test_training_gradients_match_a_dense_recomputation(form, layout):
    mixer = make(**layout).double().train()
    ref = copy.deepcopy(mixer)
    x = inputs(mixer).double().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    weight = torch.randn_like(reference(ref, x_ref))
    (mixer(x) * weight).sum().backward()
    (reference(ref, x_ref) * weight).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for (name, p), q in zip(mixer.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("form", [dispatch.GROUPED_MM], indirect=True)
def test_grouped_mm_runs_without_autograd_and_batched_with_it(form, monkeypatch):
    calls = []
    for module, name in ((bd_mlp, "mlp_grouped_mm"), (bd_mlp, "mlp_batched"), (bd, "linear_grouped_mm"),
                         (bd, "linear_batched")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    mixer = make()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        mixer.eval()(x)
        mixer.fc1(x)
    assert calls == ["mlp_grouped_mm", "linear_grouped_mm"]
    mixer.train()(x.requires_grad_()).sum().backward()
    mixer.fc1(x).sum().backward()
    assert calls[2:] == ["mlp_batched", "linear_batched"]


def test_grouped_mm_where_the_device_and_dtype_have_it():
    w = torch.zeros(4, 8, 4)
    assert dispatch.grouped_mm_supported(torch.zeros(3, 16), w)
    assert not dispatch.grouped_mm_supported(torch.zeros(3, 16, dtype=torch.float64), w.double())
    assert not dispatch.grouped_mm_supported(torch.zeros(3, 16, device="meta"), w)
    with dispatch.cpu_as_accelerator():  # an unsupported dtype falls back to batched
        chosen = dispatch.accelerator_kernel()
        dispatch.set_accelerator_kernel(dispatch.GROUPED_MM)
        try:
            assert dispatch.mlp_kernel(torch.zeros(3, 16, dtype=torch.float64), w.double()) == dispatch.BATCHED
            assert dispatch.mlp_kernel(torch.zeros(3, 16), w) == dispatch.GROUPED_MM
        finally:
            dispatch.set_accelerator_kernel(chosen)
    assert dispatch.mlp_kernel(torch.zeros(3, 16), w) == dispatch.SLICES  # the CPU outside the context


def test_a_bad_choice_is_refused_clearly():
    with pytest.raises(ValueError, match=r"accelerator kernel 'cutlass'.*expected one of"):
        dispatch.set_accelerator_kernel("cutlass")


@pytest.mark.parametrize("value, ok", [("per_group", True), ("nonsense", False)])
def test_the_environment_variable(value, ok):
    env = dict(os.environ, TIMM_SCHEME_ACCELERATOR_KERNEL=value)
    run = subprocess.run([sys.executable, "-c", "from timm_scheme.kernels import dispatch; "
                          "print(dispatch.accelerator_kernel())"], env=env, capture_output=True, text=True)
    if ok:
        assert run.returncode == 0 and run.stdout.strip() == value
    else:
        assert run.returncode != 0 and "TIMM_SCHEME_ACCELERATOR_KERNEL" in run.stderr
