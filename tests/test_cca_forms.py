"""The forms of the CCA branch (SchemeConfig.cca_form) against per-sample loops over their definitions; fusing is
exact for each; the diagnostics against a direct computation; the at-initialisation scale of each form."""
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_scheme
from timm_scheme import ChannelCovarianceAttention, SchemeConfig, SchemeMlp
from timm_scheme.diagnostics import DOMINANT_SHARE, cca_diagnostics
from timm_scheme.kernels import CCA_FORMS, cca_branch, cca_branch_plain

FORMS = list(CCA_FORMS)


def naive_branch(x, y, form, scale, normalize, groups, channels_last):
    """One sample at a time, in float64, from the written definitions (X and Y as N x C matrices)."""
    out = torch.empty_like(y, dtype=torch.float64)
    for b in range(x.shape[0]):
        def as_matrix(t):
            t = t[b].double()
            return t.reshape(-1, t.shape[-1]) if channels_last else t.reshape(t.shape[0], -1).T
        xs, ys = as_matrix(x), as_matrix(y)
        n, c = xs.shape
        if form == "authors":
            cn = xs.T.contiguous()                              # the (C, N) tensor of the authors' NCHW code
            attn = torch.softmax(scale * cn @ cn.reshape(n, c), dim=-1)
            mixed = (attn @ xs.T).T
        else:
            keys = xs / xs.norm(dim=0, keepdim=True).clamp_min(1e-12) if normalize else xs
            logits = scale * keys.T @ keys
            if form == "output_cross":
                size = c // groups
                for i in range(c):
                    logits[i, (i // size) * size:(i // size + 1) * size] = float("-inf")
            attn = torch.softmax(logits, dim=-1)
            source = ys if form in ("output", "output_cross") else xs
            mixed = source @ attn.T
            if form == "rescaled":
                mixed = mixed * (ys.pow(2).mean().sqrt() / mixed.pow(2).mean().sqrt())
        out[b] = mixed.reshape(out[b].shape) if channels_last else mixed.T.reshape(out[b].shape)
    return out


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
def test_each_form_matches_its_definition(form, channels_last, normalize):
    if form == "authors" and normalize:
        pytest.skip("the authors' form has no normalized keys")
    torch.manual_seed(0)
    shape = (3, 11, 8) if channels_last else (3, 8, 4, 5)
    x, y = torch.randn(shape), torch.randn(shape) * 0.1
    ref = naive_branch(x, y, form, 0.3, normalize, 4, channels_last)
    for run in (cca_branch, cca_branch_plain):
        got = run(x, y, form, 0.3, normalize, channels_last, 4)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    module = ChannelCovarianceAttention(0.3, normalize=normalize, channels_last=channels_last, form=form, groups=4)
    torch.testing.assert_close(module(x, y).double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_eager_and_plain_forms_have_the_same_gradients(form):
    torch.manual_seed(1)
    x = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 9, 8, dtype=torch.float64)
    grads = [torch.autograd.grad((run(x, y, form, 0.3, False, True, 4) * g).sum(), (x, y), allow_unused=True)
             for run in (cca_branch, cca_branch_plain)]
    for eager, plain in zip(*grads):
        if plain is None:
            assert eager is None or not eager.abs().any()
        else:
            torch.testing.assert_close(eager, plain, rtol=1e-5, atol=1e-6)  # the plain paper form: float32
    assert torch.autograd.gradcheck(lambda a, b: cca_branch(a, b, form, 0.3, False, True, 4), (x, y))


def test_forms_that_read_the_block_output_refuse_a_call_without_it():
    with pytest.raises(ValueError, match="cca\\(x, y\\)"):
        ChannelCovarianceAttention(0.1, form="output")(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="groups >= 2"):
        ChannelCovarianceAttention(0.1, form="output_cross", groups=1)
    with pytest.raises(ValueError, match="expected one of"):
        ChannelCovarianceAttention(0.1, form="transpose")


@pytest.mark.parametrize("options,message", [
    ({"cca_form": "covariance"}, "cca_form='covariance'"),
    ({"cca_form": "output_cross", "groups": 1}, "groups >= 2"),
    ({"cca_form": "authors", "cca_scale_mode": "normalized"}, "hidden"),
])
def test_config_refuses_forms_that_cannot_work(options, message):
    with pytest.raises(ValueError, match=message):
        SchemeConfig(cca=True, **options)


def _tiny_vit():
    return timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
                             num_classes=5)


@pytest.mark.parametrize("form", FORMS)
def test_fusing_is_exact_for_every_form(form):
    torch.manual_seed(0)
    model = timm_scheme.scheme_patch(_tiny_vit(), groups=4, expansion=8, cca=True, cca_form=form)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    model(x).square().mean().backward()  # the branch is in the graph of the trained function
    assert all(m.mix_logits.grad is not None for m in timm_scheme.scheme_mixers(model).values())
    model.eval()
    with torch.no_grad():
        before = model(x)
        with timm_scheme.cca_in_eval(model):
            trained = model(x)
    assert not torch.allclose(before, trained)  # the branch changes the training-time function
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the discarded weight, 0.5 before any annealing
        timm_scheme.fuse_for_inference(model, x)     # raises unless the fused output equals `before`
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert not any(k.endswith(("mix_logits", "cca_step")) for k in model.state_dict())


@pytest.mark.parametrize("form", ["output", "output_cross", "authors"])
def test_new_forms_trace_and_script_as_eager(form):
    torch.manual_seed(0)
    mixer = SchemeMlp(16, 64, groups=4, cca=True, cca_form=form, cca_scale=0.2).train()
    x = torch.randn(2, 7, 16)
    eager = mixer(x)
    torch.testing.assert_close(torch.jit.script(mixer)(x), eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.fx.symbolic_trace(mixer)(x), eager, rtol=1e-5, atol=1e-6)


def test_diagnostics_match_a_direct_computation():
    torch.manual_seed(0)
    model = timm_scheme.scheme_patch(_tiny_vit(), groups=4, expansion=8, cca=True, cca_form="output_cross")
    x = torch.randn(3, 3, 32, 32)
    inputs = {}
    mixers = timm_scheme.scheme_mixers(model)
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0])) for n, m in mixers.items()]
    model.eval()
    with torch.no_grad(), timm_scheme.cca_in_eval(model):
        model(x)
    for h in hooks:
        h.remove()
    report = cca_diagnostics(model, x)
    assert set(report) == set(mixers)
    for name, mixer in mixers.items():
        xs = inputs[name].double()
        # the block and the branch from the layer's own weights, written out (no kernel of the package)
        w1 = torch.block_diag(*mixer.fc1.weight.detach().double())
        w2 = torch.block_diag(*mixer.fc2.weight.detach().double())
        y = F.gelu(xs @ w1.T + mixer.fc1.bias.double()) @ w2.T + mixer.fc2.bias.double()
        branch = naive_branch(xs, y, "output_cross", mixer.cca.scale, False, 4, True)
        weight = float(torch.softmax(mixer.mix_logits.detach().double(), 0)[1])
        cca_rms, block_rms = weight * branch.pow(2).mean().sqrt(), (1 - weight) * y.pow(2).mean().sqrt()
        got = report[name]
        assert got.cca_weight == pytest.approx(weight, rel=1e-6)
        assert got.cca_share == pytest.approx(float(cca_rms / (cca_rms + block_rms)), rel=1e-4)
        # attention rows: on other groups only (cross mass 1), entropy by hand
        t = xs.reshape(xs.shape[0], -1, xs.shape[-1])
        logits = mixer.cca.scale * t.transpose(1, 2) @ t
        c = logits.shape[-1]
        same = torch.arange(c)[:, None] // (c // 4) == torch.arange(c)[None, :] // (c // 4)
        attn = torch.softmax(logits.masked_fill(same, float("-inf")), -1)
        entropy = -(attn * torch.where(attn > 0, attn.log(), torch.zeros_like(attn))).sum(-1)
        assert got.cross_group_mass == pytest.approx(1.0, abs=1e-6)  # float32 rows
        assert got.effective_channels == pytest.approx(float(entropy.exp().mean()), rel=1e-5)


def test_diagnostics_of_the_paper_form_count_attention_within_the_group():
    torch.manual_seed(0)
    model = timm_scheme.scheme_patch(_tiny_vit(), groups=4, expansion=8, cca=True)
    x = torch.randn(2, 3, 32, 32)
    mixer = timm_scheme.scheme_mixers(model)["blocks.0.mlp"]
    captured = {}
    hook = mixer.register_forward_pre_hook(lambda mod, a: captured.__setitem__("x", a[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        report = cca_diagnostics(model, x)
    hook.remove()
    t = captured["x"].double()
    attn = torch.softmax(mixer.cca.scale * t.transpose(1, 2) @ t, -1)
    c = attn.shape[-1]
    other = torch.arange(c)[:, None] // (c // 4) != torch.arange(c)[None, :] // (c // 4)
    assert report["blocks.0.mlp"].cross_group_mass == pytest.approx(float((attn * other).sum(-1).mean()), rel=1e-6)


def test_diagnostics_warn_when_the_branch_drowns_the_block_and_read_zero_once_annealed():
    torch.manual_seed(0)
    model = timm_scheme.scheme_patch(_tiny_vit(), groups=4, expansion=8, cca=True)  # the paper's form
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="blocks.0.mlp"):
        report = cca_diagnostics(model, x)
    assert all(d.cca_share > DOMINANT_SHARE for d in report.values())
    timm_scheme.set_cca_limit(model, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        annealed = cca_diagnostics(model, x)
    assert all(d.cca_share == 0.0 and d.cca_weight == 0.0 for d in annealed.values())
    assert cca_diagnostics(timm_scheme.scheme_patch(_tiny_vit(), groups=4, expansion=8), x) == {}


def _digits(px: int, count: int = 4) -> torch.Tensor:
    from sklearn.datasets import load_digits
    images = torch.tensor(load_digits().images[:count], dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(px, px), mode="bilinear", align_corners=False).clamp(0, 1)
    return ((images - 0.5) / 0.5).repeat(1, 3, 1, 1)  # as the drop-in runs normalise them


AT_INIT = {  # name: (model, image size): from 4 to 3136 tokens a mixer
    "deit_32px": (lambda: timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, depth=2,
                                            num_classes=10), 32),
    "deit_224px": (lambda: timm.create_model("deit_tiny_patch16_224", depth=2, num_classes=10), 224),
    "swin_32px": (lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4,
                                            depths=(2, 2), num_heads=(3, 6), num_classes=10), 32),
    "caformer_64px": (lambda: timm.create_model("caformer_s18", num_classes=10), 64),
}


@pytest.mark.parametrize("model_name", list(AT_INIT))
def test_at_initialisation_the_paper_form_drowns_the_block_and_the_normalized_cross_form_does_not(model_name):
    """On real images, at initialisation: the paper's branch carries nearly all of some mixer's output (RMS tens
    of times the block's), while the cross-group form on the block's output, with token-count-free logits,
    stays under a third of every mixer's output, all of its attention on other groups' channels."""
    make, px = AT_INIT[model_name]
    x = _digits(px)
    shares = {}
    for form, mode in (("paper", "hidden"), ("output_cross", "normalized")):
        torch.manual_seed(0)
        model = timm_scheme.scheme_patch(make(), groups=4, expansion=8, cca=True, cca_form=form,
                                         cca_scale_mode=mode)
        report = cca_diagnostics(model, x, warn=False)
        assert len(report) == len(timm_scheme.scheme_mixers(model))
        shares[form] = [d.cca_share for d in report.values()]
        if form == "output_cross":
            assert all(d.cross_group_mass == pytest.approx(1.0, abs=1e-5) for d in report.values())
    assert max(shares["paper"]) > 0.95
    assert max(shares["output_cross"]) < 1 / 3
