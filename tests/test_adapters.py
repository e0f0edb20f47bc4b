"""MLP adapters (timm_scheme.patching.adapters): a model the tests define, with its own MLP classes, taught to
scheme_patch through the public registry; the patched mixer against a dense re-computation, fusing, checkpoints, the host
init rule, every refusal; and the built-in adapters of timm's families against statistics of their dense layers."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_scheme
from timm_scheme import (AdaptedSchemeMlp, fuse_for_inference, register_mlp_adapter, save_pretrained, scheme_mixers,
                         scheme_patch, unregister_mlp_adapter)
from timm_scheme.patching.adapters import adapter_for

from .references import cut_to_routes, route_groups

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:fuse_for_inference:UserWarning")]


class DwMlp(nn.Module):
    """A PVTv2-like MLP: fc1, a depthwise 3x3 conv over the hidden units (needs the feature size), GELU, fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.proj_in = nn.Linear(dim, hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x, size):
        x = self.proj_in(x)
        b, n, c = x.shape
        x = self.dw(x.transpose(1, 2).reshape(b, c, *size)).flatten(2).transpose(1, 2)
        return self.proj_out(self.act(x))


class GatedMlp(nn.Module):
    """act(gate(x)) * up(x) -> down, then a BatchNorm ending the MLP (LeViT-like)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x):
        y = self.down(F.silu(self.gate(x)) * self.up(x))
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class TinyNet(nn.Module):
    """Two residual blocks of the user's own code (no timm class), a pooled linear head."""

    def __init__(self, dim=32, hidden=64):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.norm = nn.LayerNorm(dim)
        self.mlp1 = DwMlp(dim, hidden)
        self.mlp2 = GatedMlp(dim, hidden)
        self.head = nn.Linear(dim, 5)

    def forward(self, img):
        x = self.embed(img)
        size = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        x = x + self.mlp1(self.norm(x), size)
        x = x + self.mlp2(self.norm(x))
        return self.head(x.mean(1))


@pytest.fixture
def registered():
    register_mlp_adapter(DwMlp, fc1="proj_in", fc2="proj_out", hidden=("dw",))
    register_mlp_adapter(GatedMlp, fc1=("gate", "up"), fc2="down", output="bn")
    yield
    unregister_mlp_adapter(DwMlp)
    unregister_mlp_adapter(GatedMlp)


def _dense(layer):
    """The dense matrix of a block-diagonal layer, from its blocks (written here, not the layer's own helper)."""
    g, o, i = layer.weight.shape
    dense = torch.zeros(g * o, g * i)
    for k in range(g):
        dense[k * o:(k + 1) * o, k * i:(k + 1) * i] = layer.weight[k]
    return dense


def _reference(mixer, x, size):
    """DwMlp's function recomputed with dense block-diagonal matrices, times alpha (what eval computes)."""
    inner = mixer.inner
    h = x @ _dense(inner.proj_in).T + inner.proj_in.bias
    b, n, c = h.shape
    h = F.conv2d(h.transpose(1, 2).reshape(b, c, *size), inner.dw.weight, inner.dw.bias, padding=1, groups=c)
    h = F.gelu(h.flatten(2).transpose(1, 2))
    y = h @ _dense(inner.proj_out).T + inner.proj_out.bias
    return mixer.mixing_weights()[0] * y


def test_registry_patches_the_users_own_classes(registered):
    torch.manual_seed(0)
    model = scheme_patch(TinyNet(), groups=4, expansion=8, cca=True)
    mixers = scheme_mixers(model)
    assert list(mixers) == ["mlp1", "mlp2"] and all(isinstance(m, AdaptedSchemeMlp) for m in mixers.values())
    first, second = mixers["mlp1"], mixers["mlp2"]
    # the structure: block-diagonal projections, the hidden per-unit layer resized, widths of expansion 8
    assert first.inner.proj_in.weight.shape == (4, 64, 8) and first.inner.proj_out.weight.shape == (4, 8, 64)
    assert first.inner.dw.weight.shape == (256, 1, 3, 3) and first.inner.dw.groups == 256
    assert second.inner.gate.weight.shape == second.inner.up.weight.shape == (4, 64, 8)
    # eval: alpha times the class's own function with block-diagonal matrices
    x, size = torch.randn(2, 16, 32), (4, 4)
    with torch.no_grad():
        first.mix_logits.add_(torch.tensor([0.3, -0.2]))
        model.eval()
        torch.testing.assert_close(first(x, size), _reference(first, x, size), rtol=1e-5, atol=1e-6)
        model.train()
        # training: the CCA branch mixes in (1 - alpha) of a convex combination of channels
        alpha, cca_weight = first.mixing_weights()
        y = first.inner(x, size)
        cov = x.transpose(1, 2) @ x
        attn = torch.softmax(first.cca.scale * cov, dim=-1)
        torch.testing.assert_close(first(x, size), alpha * y + cca_weight * (x @ attn.transpose(1, 2)),
                                   rtol=1e-5, atol=1e-6)


def test_gate_and_value_of_a_unit_share_a_group(registered):
    """Output group j of the gated MLP depends on input group j only (before the output norm)."""
    torch.manual_seed(0)
    model = scheme_patch(TinyNet(), groups=4, expansion=8)
    inner = scheme_mixers(model)["mlp2"].inner
    x = torch.randn(1, 3, 32, requires_grad=True)
    y = inner.down(F.silu(inner.gate(x)) * inner.up(x))
    for j in range(4):
        (grad,) = torch.autograd.grad(y[..., j * 8:(j + 1) * 8].sum(), x, retain_graph=True)
        touched = grad.abs().sum((0, 1)).view(4, 8).sum(1) > 0
        assert touched.tolist() == [k == j for k in range(4)]


def test_adapted_model_trains_fuses_exactly_and_round_trips(registered, tmp_path):
    torch.manual_seed(0)
    model = scheme_patch(TinyNet(), groups=4, expansion=8, cca=True)
    x = torch.randn(4, 3, 16, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(abs(m.cca_weight() - 0.5) > 1e-4 for m in scheme_mixers(model).values())  # alpha has moved
    assert scheme_mixers(model)["mlp2"].inner.bn.weight.grad is not None
    model.eval()
    with torch.no_grad():
        want = model(x)
    fuse_for_inference(model, x)
    assert all(not m.has_cca for m in scheme_mixers(model).values())
    assert not [k for k in model.state_dict() if "mix_logits" in k or "cca" in k]
    with torch.no_grad():
        fused = model(x)
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-6)
    # a plain PyTorch checkpoint: a fresh model patched the same way loads it (the adapters are registered)
    torch.save(model.state_dict(), tmp_path / "fused.pt")
    fresh = fuse_for_inference(scheme_patch(TinyNet(), groups=4, expansion=8, cca=True).eval())
    fresh.load_state_dict(torch.load(tmp_path / "fused.pt"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), fused, rtol=0, atol=0)


def test_new_layers_start_like_the_layers_they_replace(registered):
    torch.manual_seed(0)
    dense = TinyNet(dim=64, hidden=256)
    with torch.no_grad():  # a host init unlike nn.Linear's default: trunc-normal-like 0.02, biases 0.1
        for layer in (dense.mlp1.proj_in, dense.mlp1.proj_out):
            layer.weight.normal_(0, 0.02)
            layer.bias.fill_(0.1)
        dense.mlp1.dw.weight.normal_(0, 0.3)
    stats = {k: (float(v.mean()), float(v.std())) for k, v in dense.mlp1.state_dict().items()}
    model = scheme_patch(copy.deepcopy(dense), groups=4, expansion=8)
    inner = scheme_mixers(model)["mlp1"].inner
    for key, tensor in inner.state_dict().items():
        mean, std = stats[key]
        assert abs(float(tensor.mean()) - mean) < 0.1 * max(std, 0.01), key
        assert abs(float(tensor.std()) - std) < 0.1 * std + 1e-7, key
    assert torch.equal(inner.proj_in.bias, torch.full((512,), 0.1))


@pytest.mark.parametrize("family", ["pvt_v2_b0", "levit_128s", "efficientformerv2_s0", "visformer_tiny"])
def test_timm_families_draw_like_their_dense_layers(family):
    """Each projection and per-unit layer of a patched timm family is drawn with the spread of the dense one."""
    torch.manual_seed(0)
    kwargs = {} if family == "pvt_v2_b0" else {"img_size": 64}
    dense = timm.create_model(family, pretrained=False, **kwargs)
    name, mlp = next((n, m) for n, m in dense.named_modules() if adapter_for(m, n) is not None)
    before = {k: float(v.float().std()) for k, v in mlp.state_dict().items() if v.dim() >= 1 and v.numel() > 1}
    model = scheme_patch(dense, groups=4, expansion=8)
    after = model.get_submodule(name).inner.state_dict()
    assert set(before) <= set(after)
    for key, std in before.items():
        if "running" in key:  # running statistics start fresh, like the dense model's
            continue
        assert abs(float(after[key].float().std()) - std) <= 0.15 * std + 1e-7, (key, std)


def test_applies_picks_where_a_class_is_an_mlp(registered):
    def only_named_ffn(module, name):
        return name.endswith("ffn") and len(module) == 3

    builtin = timm_scheme.mlp_adapters()[nn.Sequential]  # LowFormer's and iFormer's, kept throughout
    mine = register_mlp_adapter(nn.Sequential, fc1="0", fc2="2", applies=only_named_ffn)
    try:
        model = nn.Sequential()
        model.ffn = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        model.other = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        scheme_patch(model, groups=4, expansion=2)
        assert list(scheme_mixers(model)) == ["ffn"] and type(model.other[0]) is nn.Linear
    finally:
        unregister_mlp_adapter(nn.Sequential, mine)
    assert adapter_for(nn.Sequential(nn.Linear(2, 2)), "ffn") is None
    assert timm_scheme.mlp_adapters()[nn.Sequential] == builtin


def test_clipped_output_folds_its_bounds():
    """Gemma4's projections clamp their output; fusing scales the bounds with alpha, so the clamp stays exact."""
    torch.manual_seed(0)
    model = timm.create_model("gemma4_vit_167m", pretrained=False, num_classes=5, img_size=32, depth=1)
    scheme_patch(model, groups=4, expansion=4, cca=True)
    mixer = next(iter(scheme_mixers(model).values()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        mixer.mix_logits.add_(torch.tensor([0.3, -0.2]))
        model.eval()
        plain = mixer.inner.down_proj.linear(torch.randn(64, mixer.hidden_features))
        mixer.inner.down_proj.output_min.fill_(float(plain.quantile(0.2)))  # bounds that clamp
        mixer.inner.down_proj.output_max.fill_(float(plain.quantile(0.8)))
        want = model(x)
        fuse_for_inference(model)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
        bounds = (mixer.inner.down_proj.output_min, mixer.inner.down_proj.output_max)
    assert float(bounds[1] - bounds[0]) < float(plain.quantile(0.8) - plain.quantile(0.2))  # scaled by alpha < 1


def _patched_pvt():
    """PVTv2-B0 patched with CCA, alpha moved off 0.5 so that folding it is visible."""
    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=5)
    scheme_patch(model, groups=4, expansion=8, cca=True)
    with torch.no_grad():
        for mixer in scheme_mixers(model).values():
            mixer.mix_logits.add_(torch.tensor([0.3, -0.2]))
    return model


def test_adapted_families_round_trip_through_timm(tmp_path):
    model = _patched_pvt().eval()
    x = torch.randn(2, 3, 64, 64)
    fuse_for_inference(model)
    with torch.no_grad():
        want = model(x)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'ckpt'}", pretrained=True).eval()
    assert all(isinstance(m, AdaptedSchemeMlp) for m in scheme_mixers(loaded).values())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)


# --- refusals ----------------------------------------------------------------------------------------------

def test_registry_refuses_bad_registrations():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_mlp_adapter("DwMlp", fc1="a", fc2="b")
    with pytest.raises(ValueError, match="both fc1= and fc2="):
        register_mlp_adapter(DwMlp, fc1="proj_in")
    with pytest.raises(ValueError, match="timm's own MLP class"):
        register_mlp_adapter(timm.layers.Mlp, fc1="fc1", fc2="fc2")
    with pytest.raises(ValueError, match="not both"):
        register_mlp_adapter(DwMlp, timm_scheme.MlpAdapter(fc1="proj_in", fc2="proj_out"), fc1="proj_in")
    with pytest.raises(ValueError, match="attribute paths"):
        register_mlp_adapter(DwMlp, fc1=(), fc2="proj_out")
    assert adapter_for(DwMlp(8, 16)) is None


@pytest.mark.parametrize("adapter, message", [
    (dict(fc1="proj_inn", fc2="proj_out", hidden=("dw",)), r"fc1='proj_inn'.*'mlp1' does not have"),
    (dict(fc1="proj_in", fc2="proj_out"), r"'mlp1', dw is Conv2d with state of the hidden width 64.*hidden="),
    (dict(fc1="proj_in", fc2="dw", hidden=()), r"projection 'dw' of layer 'mlp1' is Conv2d"),
    (dict(fc1="dw", fc2="proj_out", hidden=()), r"projection 'dw' of layer 'mlp1' is Conv2d"),
    (dict(fc1="proj_in", fc2="proj_out", hidden=("dw",), output="act"), r"output='act'.*GELU"),
])
def test_bad_adapters_are_refused_naming_the_layer(adapter, message):
    register_mlp_adapter(DwMlp, **adapter)
    try:
        model = TinyNet()
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match=message):
            scheme_patch(model, groups=4, expansion=8)
        assert type(model.mlp1) is DwMlp and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    finally:
        unregister_mlp_adapter(DwMlp)


def test_a_layer_mixing_hidden_units_is_refused():
    class Mixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.mid, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 16)

        def forward(self, x):
            return self.fc2(self.mid(self.fc1(x)))

    register_mlp_adapter(Mixing, fc1="fc1", fc2="fc2", hidden=("mid",))
    try:
        with pytest.raises(ValueError, match=r"'mlp', mid is Linear.*cannot be made block-diagonal"):
            scheme_patch(_holder(Mixing()), groups=4)
    finally:
        unregister_mlp_adapter(Mixing)


def _holder(mlp):
    model = nn.Module()
    model.mlp = mlp
    return model


def test_grouped_hidden_conv_must_nest_in_the_groups():
    class Grouped(nn.Module):
        def __init__(self, conv_groups):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(16, 32, 1), nn.Conv2d(32, 16, 1)
            self.mid = nn.Conv2d(32, 32, 3, padding=1, groups=conv_groups)

        def forward(self, x):
            return self.fc2(self.mid(self.fc1(x)))

    register_mlp_adapter(Grouped, fc1="fc1", fc2="fc2", hidden=("mid",))
    try:
        model = scheme_patch(_holder(Grouped(8)), groups=4, expansion=4)  # 8 conv groups nest in 4 SCHEME groups
        assert model.mlp.inner.mid.groups == 8 and model.mlp.inner.mid.weight.shape == (64, 8, 3, 3)
        with pytest.raises(ValueError, match=r"grouped conv with 2 groups.*groups=4"):
            scheme_patch(_holder(Grouped(2)), groups=4, expansion=4)
    finally:
        unregister_mlp_adapter(Grouped)


def test_options_adapted_layers_do_not_take_are_refused(registered):
    with pytest.raises(ValueError, match=r"channel_shuffle.*'mlp1'"):
        scheme_patch(TinyNet(), groups=4, expansion=8, channel_shuffle=True)
    # widths a group count does not divide: refused, or (skip_unfit) left dense and reported
    model = _holder(DwMlp(32, 64))
    model.narrow = DwMlp(36, 72)
    with pytest.raises(ValueError, match=r"groups=8 does not divide in_features=36 of layer 'narrow'"):
        scheme_patch(model, groups=8, expansion=2)
    scheme_patch(model, groups=8, expansion=2, skip_unfit=True)
    assert list(scheme_mixers(model)) == ["mlp"] and type(model.narrow) is DwMlp
    assert "in_features=36" in model.scheme_skipped["narrow"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_adapted_mixers_quantize_through_their_own_forward():
    from timm_scheme.integrations import quantize as Q
    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=5)
    fuse_for_inference(scheme_patch(model, groups=4, expansion=8, cca=True).eval())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        quantized = Q.quantize_dynamic_int8(model)
        out = quantized(x)
    mixers = scheme_mixers(quantized)
    assert all(isinstance(m, AdaptedSchemeMlp) for m in mixers.values())
    assert all(isinstance(m.fc1, Q.Int8BlockDiagonalLinear) and isinstance(m.fc2, Q.Int8BlockDiagonalLinear)
               for m in mixers.values())
    assert float((out - want).norm() / want.norm()) < 0.1


def test_lora_reaches_adapted_projections():
    peft = pytest.importorskip("peft")
    from timm_scheme.integrations.lora import BlockDiagonalLora, register_lora
    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=5)
    scheme_patch(model, groups=4, expansion=4)
    x = torch.randn(2, 3, 64, 64)
    lora_model = peft.get_peft_model(model, register_lora(peft.LoraConfig(r=2, target_modules=["fc1", "fc2"])))
    wrapped = [m for n, m in lora_model.named_modules() if isinstance(m, BlockDiagonalLora)]
    assert len(wrapped) == 2 * len(scheme_mixers(model))
    with torch.no_grad():  # an update that is not zero (PEFT starts B at zero)
        for layer in wrapped:
            for name, param in layer.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
    lora_model.eval()
    with torch.no_grad():
        unmerged = lora_model(x)
        base = lora_model.get_base_model()
        with lora_model.disable_adapter():
            without = lora_model(x)
    assert float((unmerged - without).abs().max()) > 1e-4  # the adapters change the adapted mixers' output
    merged = lora_model.merge_and_unload()
    assert base is merged
    assert all(type(m.fc1) is timm_scheme.BlockDiagonalLinear for m in scheme_mixers(merged).values())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning")
def test_adapted_models_script_and_trace():
    """TorchScript (timm's own model tests script PVTv2) and jit.trace, fused and unfused, equal eager."""
    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=5)
    scheme_patch(model, groups=4, expansion=8, cca=True).eval()
    x = torch.randn(2, 3, 64, 64)
    for fused in (False, True):
        if fused:
            fuse_for_inference(model)
        with torch.no_grad():
            want = model(x)
            torch.testing.assert_close(torch.jit.script(model)(x), want, rtol=1e-5, atol=1e-6)
            traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64))
            torch.testing.assert_close(traced(x), want, rtol=1e-5, atol=1e-6)


# --- init="dense" through adapters ------------------------------------------------------------------------

def _random_norm_state(model):
    """BatchNorms with affine parameters and running statistics away from their initial values."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)


def _masked_dense(dense_mlp, adapter, units, groups):
    """The dense MLP with every projection cut to its blocks: unit u, assigned to group k, keeps only the
    weights from input group k (fc1) and to output group k (fc2). Units stay in place (per-unit layers need no
    moving), so this is computed from the dense module and the assignment alone."""
    masked = copy.deepcopy(dense_mlp)
    fc2 = masked.get_submodule(adapter.fc2).weight
    in_group, out_group = route_groups(units, groups, fc2.shape[1])
    cut_to_routes([masked.get_submodule(p).weight for p in adapter.fc1_paths], fc2, in_group, out_group, groups)
    return masked


@pytest.mark.parametrize("family", ["pvt_v2_b0", "levit_128s", "efficientformerv2_s0", "vitamin_small_224",
                                    "efficientvit_b0"])
def test_dense_init_of_adapted_families_is_the_block_projection(family):
    torch.manual_seed(0)
    kwargs = {"pvt_v2_b0": {}, "efficientvit_b0": {}, "vitamin_small_224": dict(img_size=64, depth=1)}.get(
        family, dict(img_size=64))
    dense = timm.create_model(family, pretrained=False, **kwargs).eval()
    _random_norm_state(dense)  # pretrained-like state: no zero-initialised output norms, running statistics set
    name, mlp = next((n, m) for n, m in dense.named_modules() if adapter_for(m, n) is not None)
    adapter = adapter_for(mlp, name)
    model = scheme_patch(copy.deepcopy(dense), groups=4, expansion=None, init="dense", cca=True).eval()
    layer = model.scheme_init_report.layers[name]
    assert layer.retained_energy >= layer.diagonal_energy - 1e-9 and layer.objective == "energy"
    reference = _masked_dense(mlp, adapter, layer.units, 4)
    captured = {}
    hook = dense.get_submodule(name).register_forward_hook(lambda m, args, out: captured.update(args=args))
    with torch.no_grad():
        dense(torch.randn(2, 3, 64, 64))
        hook.remove()
        want = reference(*captured["args"])
        got = model.get_submodule(name)(*captured["args"])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert float((want - mlp(*captured["args"])).norm()) > 0  # the cut is not the dense MLP itself


def test_dense_init_keeps_new_units_silent_and_refuses_what_cannot_move(registered):
    torch.manual_seed(0)
    dense = TinyNet().eval()
    model = scheme_patch(copy.deepcopy(dense), groups=4, expansion=4, init="dense").eval()  # 64 -> 128 units
    inner = scheme_mixers(model)["mlp1"].inner
    units = model.scheme_init_report.layers["mlp1"].units
    assert all(kept.count(-1) == 16 for kept in units)  # half of each group's 32 slots are new
    new_slots = [(k, t) for k, kept in enumerate(units) for t, u in enumerate(kept) if u < 0]
    assert len(new_slots) == 64 and not any(inner.proj_out.weight[k, :, t].any() for k, t in new_slots)
    assert all(inner.proj_out.weight[k, :, t].any() for k, kept in enumerate(units) for t, u in enumerate(kept)
               if u >= 0)
    # the dwconv of a kept unit is the dense unit's
    k, t = 1, 0
    torch.testing.assert_close(inner.dw.weight[k * 32 + t], dense.mlp1.dw.weight[units[k][t]])

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(16, 32, 1), nn.Conv2d(32, 16, 1)
            self.mid = nn.Conv2d(32, 32, 3, padding=1, groups=8)

        def forward(self, x):
            return self.fc2(self.mid(self.fc1(x)))

    register_mlp_adapter(Grouped, fc1="fc1", fc2="fc2", hidden=("mid",))
    try:
        with pytest.raises(ValueError, match=r"'mlp', mid is a grouped conv.*init='random'"):
            scheme_patch(_holder(Grouped()), groups=4, init="dense")
    finally:
        unregister_mlp_adapter(Grouped)


# --- the fused kernels where the structure allows them -------------------------------------------------------

@pytest.mark.parametrize("family, size", [("levit_128s", 64), ("levit_conv_128s", 64), ("efficientvit_m0", 64),
                                          ("fastvit_t8", 64), ("lowformer_b0", 64), ("iformer_t", 64)])
def test_fused_kernels_compute_the_family_forward(family, size):
    """Where the adapter declares pre -> fc1 -> [BatchNorm] -> act -> fc2 -> [BatchNorm], eval runs SCHEME's fused
    kernel (BatchNorms folded): equal to the family's own forward, which it does not call."""
    torch.manual_seed(0)
    kwargs = dict(img_size=size) if family.startswith(("levit", "efficientvit_m")) else {}
    model = timm.create_model(family, pretrained=False, num_classes=5, **kwargs)
    scheme_patch(model, groups=4, expansion=8, cca=True)
    _random_norm_state(model)
    model.eval()
    mixers = scheme_mixers(model)
    assert all(m.kernel_plan is not None and m.fused_kernel_ok() for m in mixers.values())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = model(x)
        for mixer in mixers.values():  # the family's forward, layer by layer, as reference
            mixer.kernel_plan, mixer.saved_plan = None, mixer.kernel_plan
        reference = model(x)
        for mixer in mixers.values():
            mixer.kernel_plan = mixer.saved_plan
            mixer.inner.forward = None  # the fused path must not call it
        torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(want, reference, rtol=1e-4, atol=1e-5)
    model.train()  # folded BatchNorms on batch statistics: the family's forward again
    folded = [m for m in mixers.values() if m.kernel_plan[2] or m.kernel_plan[3]]
    assert not any(m.fused_kernel_ok() for m in folded) and (folded or family in ("fastvit_t8", "lowformer_b0"))


def test_fused_kernels_train_like_the_family_forward():
    """Without norms to fold (LowFormer: GroupNorm on the input, 1x1 convs, GELU), training runs the fused
    kernels too: the same loss and gradients as the family's forward."""
    torch.manual_seed(0)
    model = timm.create_model("lowformer_b0", pretrained=False, num_classes=5)
    scheme_patch(model, groups=4, expansion=8, cca=True).train()
    x = torch.randn(2, 3, 64, 64)
    mixers = scheme_mixers(model)
    assert all(m.fused_kernel_ok() for m in mixers.values())
    grads = []
    for plan_on in (True, False):
        for mixer in mixers.values():
            mixer.kernel_plan = mixer.kernel_plan if plan_on else None
        model.zero_grad()
        model(x).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if ".inner." in n})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_wrong_kernel_declaration_is_refused():
    class Doubled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)) * 2)

    register_mlp_adapter(Doubled, fc1="fc1", fc2="fc2", act="act")
    try:
        with pytest.raises(ValueError, match=r"declares act='act'.*does not compute what layer 'mlp'"):
            scheme_patch(_holder(Doubled()), groups=4, expansion=2)
    finally:
        unregister_mlp_adapter(Doubled)
    register_mlp_adapter(Doubled, fc1="fc1", fc2="fc2")  # no declaration: the family's forward, correct
    try:
        model = scheme_patch(_holder(Doubled()), groups=4, expansion=2)
        assert model.mlp.kernel_plan is None
    finally:
        unregister_mlp_adapter(Doubled)


def test_calibrated_fusing_fuses_adapted_layers_exactly(caplog):
    """fuse_for_inference(calibration_data=...) refits timm.layers' MLPs; adapted ones are fused as they are."""
    model = _patched_pvt().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    with caplog.at_level("WARNING", logger="timm_scheme"):
        fuse_for_inference(model, calibration_data=torch.randn(4, 3, 64, 64), warn_threshold=1.0)
    assert "not refit" in caplog.text and model.scheme_fuse_report.calibrated == []
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["levit_128s", "efficientvit_m0", "shvit_s1", "iformer_t"])
def test_timm_reparameterize_model_keeps_the_function(family):
    """timm's reparameterize_model (validate.py / benchmark.py --reparam) replaces children that have fuse() by
    what it returns; the Conv+BN pairs holding block-diagonal projections stay as they are, the rest fuses."""
    import pickle

    from timm.models import reparameterize_model
    torch.manual_seed(0)
    kwargs = dict(img_size=64) if family.startswith(("levit", "efficientvit")) else {}
    model = timm.create_model(family, pretrained=False, num_classes=5, **kwargs)
    scheme_patch(model, groups=4, expansion=8, cca=True)
    _random_norm_state(model)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        for candidate in (reparameterize_model(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(candidate(x), want, rtol=1e-5, atol=1e-5)
    reparam = reparameterize_model(model)
    assert not any(m.has_cca for m in scheme_mixers(reparam).values())  # the mixers fused too
    assert all(isinstance(m.fc1, (timm_scheme.BlockDiagonalLinear, timm_scheme.BlockDiagonalConv1x1))
               for m in scheme_mixers(reparam).values())
