"""torch.compile on SCHEME mixers: no graph breaks in training, eval or fused form, also with the CCA skip
threshold on; compiled results equal eager ones."""
import pytest
import torch
import torch._dynamo as dynamo

from timm_scheme.layers import SchemeMlp


def make(use_conv: bool, threshold: float = 0.01) -> SchemeMlp:
    torch.manual_seed(0)
    mlp = SchemeMlp(16, 64, groups=4, use_conv=use_conv)
    mlp.cca_skip_threshold = threshold
    return mlp


def example(use_conv: bool) -> torch.Tensor:
    return torch.randn(2, 16, 4, 5) if use_conv else torch.randn(2, 10, 16)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize("use_conv", [False, True])
@pytest.mark.parametrize("form", ["train", "eval", "fused"])
def test_mixer_traces_without_graph_breaks(use_conv, form):
    mlp = make(use_conv)
    if form != "train":
        mlp.eval()
    if form == "fused":
        mlp.fuse()
    x = example(use_conv)
    with torch.set_grad_enabled(form == "train"):
        explanation = dynamo.explain(mlp)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("use_conv", [False, True])
def test_compiled_training_step_matches_eager(use_conv):
    """aot_eager traces forward and backward (the custom autograd Functions included) without inductor's
    C++ build, so this stays fast; the inductor run is in the slow test below."""
    mlp = make(use_conv)
    x = example(use_conv)
    compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)
    y = compiled(x.clone().requires_grad_())
    eager_x = x.clone().requires_grad_()
    ref = mlp(eager_x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(y.square().sum(), list(mlp.parameters()))
    want = torch.autograd.grad(ref.square().sum(), list(mlp.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compiled_forward_follows_the_skip_decision_without_syncing():
    mlp = make(use_conv=False, threshold=0.2)
    x = example(False)
    compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)
    with_cca = compiled(x)
    with torch.no_grad():
        mlp.mix_logits.copy_(torch.tensor([5.0, -5.0]))  # CCA weight ~ 4.5e-5: below the threshold
    assert mlp.update_cca_skip()
    alpha = mlp.mixing_weights()[0]
    torch.testing.assert_close(compiled(x), alpha * mlp.bd_mlp(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_cca, compiled(x))


@pytest.mark.slow
@pytest.mark.parametrize("use_conv", [False, True])
def test_inductor_compiles_training_and_fused_mixer(use_conv):
    mlp = make(use_conv)
    x = example(use_conv)
    compiled = torch.compile(mlp, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, mlp(x), rtol=1e-4, atol=1e-4)
    mlp.eval().fuse()
    compiled = torch.compile(mlp, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), mlp(x), rtol=1e-4, atol=1e-4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(compiled(x).float(), mlp(x).float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("use_conv", [False, True])
def test_channel_shuffle_compiles_without_graph_breaks_and_matches_eager(use_conv):
    torch.manual_seed(0)
    mlp = SchemeMlp(16, 64, groups=4, use_conv=use_conv, channel_shuffle=True).train()
    x = example(use_conv)
    explanation = dynamo.explain(mlp)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(mlp, backend="aot_eager")
    torch.testing.assert_close(compiled(x), mlp(x))
