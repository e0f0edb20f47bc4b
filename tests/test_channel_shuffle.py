"""The channel shuffle option: every kernel, layout and form against a dense re-computation with an explicit
permutation index; fusing, checkpoints, init='dense', tracing and export; bad widths."""
from __future__ import annotations

import copy
import itertools
import warnings

import onnxruntime
import pytest
import timm
import torch
from timm.utils.onnx import onnx_export
from torch import nn

import timm_scheme
import timm_scheme.kernels.mlp as bd_mlp
from timm_scheme import SchemeMlp, fuse_for_inference, scheme_patch
from timm_scheme.conversion import layer_output_errors
from timm_scheme.io import save_pretrained
from timm_scheme.mixers import scheme_mixers

from .models import create, example_input
from .references import cut_to_routes, ridge_per_group, route_groups


def shuffle_index(hidden: int, groups: int) -> torch.Tensor:
    """fc2 input position p reads fc1 hidden unit index[p]: fc2 group j's chunk i is fc1 group i's chunk j."""
    chunk, per_group = hidden // (groups * groups), hidden // groups
    return torch.tensor([i * per_group + j * chunk + t
                         for j in range(groups) for i in range(groups) for t in range(chunk)])


def reference(mixer: SchemeMlp, x: torch.Tensor) -> torch.Tensor:
    """The eval-mode mixer in float64 from dense block-diagonal matrices and, with the shuffle, the explicit
    index."""
    g = mixer.groups
    w1 = torch.block_diag(*mixer.fc1.weight.double().unbind(0))
    w2 = torch.block_diag(*mixer.fc2.weight.double().unbind(0))
    tokens = x.double().movedim(1, -1) if mixer.use_conv else x.double()
    h = tokens @ w1.T
    if mixer.fc1.bias is not None:
        h = h + mixer.fc1.bias.double()
    if mixer.gated:
        pairs = h.unflatten(-1, (g, 2, -1))
        first, second = pairs[..., 0, :], pairs[..., 1, :]
        h = (first * mixer.act(second) if mixer.gate_last else mixer.act(first) * second).flatten(-2)
    else:
        h = mixer.act(h)
    if isinstance(mixer.norm, nn.LayerNorm):  # the only hidden norm these tests build
        norm = mixer.norm
        h = nn.functional.layer_norm(h, norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps)
    if mixer.channel_shuffle:
        h = h[..., shuffle_index(mixer.hidden_features, g)]
    y = h @ w2.T
    if mixer.fc2.bias is not None:
        y = y + mixer.fc2.bias.double()
    if mixer.has_cca:
        y = y * mixer.mixing_weights()[0].double()
    return y.movedim(-1, 1) if mixer.use_conv else y


def make(use_conv=False, gated=False, gate_last=True, norm=False, cca=False, channels=16, hidden=64, groups=4):
    torch.manual_seed(0)
    mixer = SchemeMlp(channels, hidden, groups=groups, use_conv=use_conv, gated=gated, gate_last=gate_last,
                      norm_layer=nn.LayerNorm if norm else None, cca=cca, channel_shuffle=True)
    with torch.no_grad():  # biases and norm parameters away from their neutral values
        for p in mixer.parameters():
            if p.dim() == 1 and p.numel() > 2:
                p.copy_(torch.randn_like(p) * 0.5)
    return mixer


def inputs(mixer: SchemeMlp, tokens: int = 37) -> torch.Tensor:
    channels = mixer.fc1.in_features
    return torch.randn(2, channels, 5, 7) if mixer.use_conv else torch.randn(2, tokens, channels)


LAYOUTS = [dict(), dict(use_conv=True), dict(gated=True), dict(gated=True, gate_last=False),
           dict(use_conv=True, gated=True), dict(norm=True)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(d) or "plain")
def test_eval_forward_matches_the_explicit_permutation(layout, monkeypatch):
    mixer = make(**layout).eval()
    monkeypatch.setattr(bd_mlp, "TILE_BYTES_PER_THREAD", 64 * 4 * 8)  # several token tiles per call
    x = inputs(mixer, tokens=300)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x).double(), reference(mixer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(d) or "plain")
def test_training_gradients_match_the_explicit_permutation(layout, recompute):
    mixer = make(**layout).double().train()
    mixer.recompute_hidden = recompute
    ref = copy.deepcopy(mixer)
    x = inputs(mixer).double().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    weight = torch.randn_like(mixer(x))
    (mixer(x) * weight).sum().backward()
    (reference(ref, x_ref) * weight).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for (name, p), q in zip(mixer.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("form", ["per_group", "batched"])
def test_other_kernel_forms_match(form):
    """The forms torch.compile / autocast (per group) and accelerators (batched) run, called directly on CPU."""
    mixer = make(gated=True).double()
    x = inputs(mixer).double()
    kernel = bd_mlp.mlp_per_group if form == "per_group" else bd_mlp.mlp_batched
    y = kernel(x, mixer.fc1.weight, mixer.fc1.bias, mixer.fc2.weight, mixer.fc2.bias, mixer.group_hidden,
               shuffle=True)
    torch.testing.assert_close(y, reference(mixer, x))


def test_fusing_is_exact_and_keeps_the_shuffle():
    mixer = make(cca=True).eval()
    with torch.no_grad():
        mixer.mix_logits.copy_(torch.tensor([0.3, -0.4]))
    x = inputs(mixer)
    with torch.no_grad():
        before = mixer(x)
        expected = reference(mixer, x)
        mixer.fuse()
        torch.testing.assert_close(mixer(x), before, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixer(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert mixer.channel_shuffle and not mixer.has_cca


def test_shuffle_changes_the_function():
    """The option is not a no-op: the same weights without the shuffle compute something else."""
    mixer = make().eval()
    plain = copy.deepcopy(mixer)
    plain.channel_shuffle = False
    x = inputs(mixer)
    with torch.no_grad():
        assert (mixer(x) - plain(x)).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["trace", "script"])
def test_traced_and_scripted_forms_match(mode):
    mixer = make(gated=True).eval()
    x = inputs(mixer)
    recorded = torch.jit.trace(mixer, x) if mode == "trace" else torch.jit.script(mixer)
    other = inputs(mixer, tokens=11)
    with torch.no_grad():
        torch.testing.assert_close(recorded(other).double(), reference(mixer, other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", ["deit_tiny_patch16_224", "caformer_s18"])
def test_patched_model_trains_fuses_saves_and_loads(key, tmp_path):
    model = scheme_patch(create(key), groups=4, expansion=8, channel_shuffle=True, cca=True)
    assert all(m.channel_shuffle for m in scheme_mixers(model).values())
    x = example_input(key)
    model.train()
    model(x).sum().backward()
    assert all(m.fc1.weight.grad is not None for m in scheme_mixers(model).values())
    model.eval()
    with torch.no_grad():
        before = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the discarded CCA weight (untrained model)
        fuse_for_inference(model, x)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'ckpt'}", pretrained=True).eval()
    assert loaded.scheme_config.channel_shuffle
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), before, rtol=1e-5, atol=1e-5)


def test_legacy_onnx_export_matches_in_onnxruntime(tmp_path):
    model = scheme_patch(create("deit_tiny_patch16_224"), groups=4, expansion=8, channel_shuffle=True).eval()
    fuse_for_inference(model)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        onnx_export(model, str(path), example_input=example_input("deit_tiny_patch16_224"), use_dynamo=False)
    x = example_input("deit_tiny_patch16_224", batch=3)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)


def test_calibrated_fusing_refits_fc2_on_the_shuffled_units():
    """fc2 group j is refit (ridge, as documented) on the units it reads through the shuffle: an independent
    solve on the explicitly permuted hidden activations."""
    torch.manual_seed(0)
    mixer = SchemeMlp(16, 64, groups=4, alpha_init=0.4, channel_shuffle=True).eval()
    x = torch.randn(3, 40, 16)
    with torch.no_grad(), timm_scheme.cca_in_eval(mixer):
        target = mixer(x).double().reshape(-1, 16)
    hidden = nn.functional.gelu(x.double() @ mixer.fc1.dense_weight().double().t() + mixer.fc1.bias.double())
    want_w, want_b = ridge_per_group(hidden.reshape(-1, 64)[:, shuffle_index(64, 4)], target, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the CCA weight fusing discards
        fuse_for_inference(nn.Sequential(mixer), calibration_data=x)
    torch.testing.assert_close(mixer.fc2.weight.detach().double(), want_w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mixer.fc2.bias.detach().double(), want_b, rtol=1e-4, atol=1e-6)


# --- init="dense" ---------------------------------------------------------------------------------------

def _route_projection(dense: nn.Module, patched: nn.Module) -> nn.Module:
    """The dense model with each kept unit cut to its route: fc1 row masked to the route's input group, fc2
    column to its output group; dropped units silenced. Route r = i * groups + j."""
    reference_model = copy.deepcopy(dense)
    modules = dict(reference_model.named_modules())
    groups = patched.scheme_config.groups
    for name, layer in patched.scheme_init_report.layers.items():
        mlp = modules[name]
        in_group, out_group = route_groups(layer.units, groups, mlp.fc2.weight.shape[1])
        cut_to_routes([mlp.fc1.weight], mlp.fc2.weight, in_group, out_group, groups)
    return reference_model


def _trained_like(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp" in name and p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def test_dense_init_computes_the_route_projection():
    dense = _trained_like(create("deit_tiny_patch16_224")).eval()
    patched = scheme_patch(copy.deepcopy(dense), groups=4, expansion=4, init="dense", channel_shuffle=True).eval()
    layer = patched.scheme_init_report.layers["blocks.0.mlp"]
    assert len(layer.units) == 16 and all(len(kept) == 192 * 4 // 16 for kept in layer.units)
    kept = sorted(u for route in layer.units for u in route)
    assert kept == list(range(192 * 4))  # every original unit placed once
    x = example_input("deit_tiny_patch16_224")
    with torch.no_grad():
        torch.testing.assert_close(patched(x), _route_projection(dense, patched)(x), rtol=1e-4, atol=1e-4)
    # the routes let units keep weights that cross groups: more energy than the diagonal blocks in order
    assert layer.retained_energy > layer.diagonal_energy


def test_calibrated_dense_init_and_refit_lower_the_error():
    dense = _trained_like(create("deit_tiny_patch16_224")).eval()
    images = example_input("deit_tiny_patch16_224", batch=16)
    by_energy = scheme_patch(copy.deepcopy(dense), groups=4, expansion=8, init="dense", channel_shuffle=True)
    calibrated = scheme_patch(copy.deepcopy(dense), groups=4, expansion=8, init="dense", channel_shuffle=True,
                              calibration_data=images)
    energy_errors = layer_output_errors(dense, by_energy, images)
    calibrated_errors = layer_output_errors(dense, calibrated, images)
    assert all(calibrated_errors[n] < energy_errors[n] for n in energy_errors)


def test_dense_init_round_trips_with_the_shuffle(tmp_path):
    patched = scheme_patch(_trained_like(create("deit_tiny_patch16_224")), groups=4, expansion=8, init="dense",
                           channel_shuffle=True).eval()
    save_pretrained(patched, tmp_path / "ckpt")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'ckpt'}", pretrained=True).eval()
    x = example_input("deit_tiny_patch16_224")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), patched(x))


# --- bad widths -----------------------------------------------------------------------------------------

def test_widths_not_divisible_by_groups_squared_are_refused_clearly():
    with pytest.raises(ValueError, match=r"channel_shuffle needs hidden_features=24 .* groups\*\*2=16"):
        SchemeMlp(8, 24, groups=4, channel_shuffle=True)
    model = create("deit_tiny_patch16_224")
    with pytest.raises(ValueError, match=r"channel_shuffle .* hidden width 1000 of layer 'blocks.0.mlp'"):
        scheme_patch(model, groups=4, expansion=1000 / 192, channel_shuffle=True)
    assert not any(isinstance(m, SchemeMlp) for m in model.modules())  # refused before any change


@pytest.mark.parametrize("groups, expansion", list(itertools.product([2, 4], [4, 8])))
def test_shuffle_at_every_group_count_the_family_uses(groups, expansion):
    mixer = make(groups=groups, hidden=16 * expansion).eval()
    x = inputs(mixer)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x).double(), reference(mixer, x), rtol=1e-5, atol=1e-5)
