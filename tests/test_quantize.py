"""int8 block-diagonal layers (timm_scheme.integrations.quantize, layers.int8, kernels.int8): exact against an
int8 reference written here, close to the float layers and models, both entry points (torch.ao quantize_dynamic,
torchao quantize_), accuracy on digits, and refusing a model that is not fused."""
import copy
import pickle

import pytest
import timm
import torch
from torch import nn

import timm_scheme
from timm_scheme.integrations import quantize as Q
from timm_scheme.kernels import int8 as int8_kernels
from timm_scheme.layers import int8 as int8_layers
from timm_scheme.layers import BlockDiagonalConv1x1, BlockDiagonalLinear, SchemeMlp

from .scenarios import HAS_TORCHAO, QUANTIZE_ENTRY_POINTS, fused_deit, train_digits

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # torch.ao.quantization announces its deprecation on every quantize_dynamic call
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
              pytest.mark.filterwarnings("ignore:fuse_for_inference:UserWarning")]

FLOAT_TYPES = (nn.Linear, BlockDiagonalLinear, BlockDiagonalConv1x1)


def _int8_reference(x2d, weight, bias):
    """The int8 layer's function from its definition: x quantized per token and group, the weights per group
    and output channel (round(v * (127 / amax)), ties to even), integer products summed in float64 (exact),
    then rescaled in float64."""
    groups, out_g, in_g = weight.shape
    xg = x2d.float().reshape(-1, groups, in_g)
    x_amax = xg.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    x_int = torch.round(xg * (127.0 / x_amax))
    w_amax = weight.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    w_int = torch.round(weight * (127.0 / w_amax))
    assert x_int.abs().max() <= 127 and w_int.abs().max() <= 127
    products = torch.einsum("tgi,goi->tgo", x_int.double(), w_int.double())
    y = products * (x_amax.double() / 127) * (w_amax.double() / 127).squeeze(-1)
    y = y.reshape(x2d.shape[0], groups * out_g)
    return y + bias.double() if bias is not None else y


def _rel(ref, out):
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def _float_layer(conv, in_f, out_f, groups, bias):
    kind = BlockDiagonalConv1x1 if conv else BlockDiagonalLinear
    layer = kind(in_f, out_f, groups, bias=bias)
    if bias:  # a bias large enough to matter
        nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1x1"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_int8_layer_matches_int8_reference(conv, bias, groups):
    layer = _float_layer(conv, 64, 96, groups, bias)
    qlayer = Q.INT8_MODULES[type(layer)].from_float(layer)
    if conv:
        x = torch.randn(2, 64, 5, 3)
        x2d = x.permute(0, 2, 3, 1).reshape(-1, 64)
    else:
        x = torch.randn(3, 7, 64) * torch.rand(3, 7, 1) * 4  # tokens of different magnitudes
        x2d = x.reshape(-1, 64)
    y = qlayer(x)
    assert y.shape == layer(x).shape and y.dtype == x.dtype
    ref = _int8_reference(x2d, layer.weight.detach(), layer.bias.detach() if bias else None)
    y2d = y.permute(0, 2, 3, 1).reshape(-1, 96) if conv else y.reshape(-1, 96)
    assert _rel(ref, y2d) < 1e-6
    # the integer weights are the reference's
    w_amax = layer.weight.detach().abs().amax(-1, keepdim=True)
    assert torch.equal(qlayer.weight_int8, torch.round(layer.weight.detach() * (127.0 / w_amax)).to(torch.int8))


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1x1"])
def test_int8_layer_close_to_float_and_dequantize_round_trips(conv):
    layer = _float_layer(conv, 64, 128, 4, True)
    qlayer = Q.INT8_MODULES[type(layer)].from_float(layer)
    x = torch.randn(2, 64, 6, 6) if conv else torch.randn(4, 9, 64)
    with torch.no_grad():
        y, yq, y_back = layer(x), qlayer(x), qlayer.dequantize()(x)
    rel = float((yq - y).norm() / y.norm())
    assert rel < 0.02, rel  # measured 0.6%

    back = qlayer.dequantize()
    assert type(back) is type(layer) and qlayer.to_float().extra_repr() == layer.extra_repr()
    assert torch.equal(back.weight, qlayer.weight_int8.float() * qlayer.weight_scale.unsqueeze(-1))
    assert torch.equal(back.bias, layer.bias)
    # rounding to the nearest step of each group's and channel's scale
    error = (back.weight - layer.weight).detach().abs()
    assert bool((error <= qlayer.weight_scale.unsqueeze(-1) * (0.5 + 1e-5)).all())
    # quantizing the dequantized layer gives the same integers (scales equal to float rounding)
    again = type(qlayer).from_float(back)
    assert torch.equal(again.weight_int8, qlayer.weight_int8)
    torch.testing.assert_close(again.weight_scale, qlayer.weight_scale, rtol=1e-6, atol=0)
    # the dequantized float layer differs from the int8 one by the activation rounding alone
    assert float((y_back - yq).norm() / yq.norm()) < 0.02


def test_int_mm_shape_rules_and_the_exact_fallback(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert int8_kernels.int_mm_supported(1, 3, 5, cpu)
    assert int8_kernels.int_mm_supported(17, 64, 32, cuda)
    # cuBLASLt: more than 16 rows, inner and output widths multiples of 8
    assert not int8_kernels.int_mm_supported(16, 64, 32, cuda)
    assert not int8_kernels.int_mm_supported(32, 12, 32, cuda)
    assert not int8_kernels.int_mm_supported(32, 64, 20, cuda)
    assert not int8_kernels.int_mm_supported(32, 64, 32, torch.device("meta"))

    layer = BlockDiagonalLinear(48, 72, 3)
    qlayer = Q.Int8BlockDiagonalLinear.from_float(layer)
    x = torch.randn(5, 48)
    y = qlayer(x)
    monkeypatch.setattr(int8_kernels, "int_mm_supported", lambda *args: False)
    assert torch.equal(qlayer(x), y)  # the float products are the same integers
    # float64 once float32 could round: depth 2048 (sums up to 2048 * 127**2 > 2**24)
    a = torch.randint(-127, 128, (3, 2048), dtype=torch.int8)
    b = torch.randint(-127, 128, (2048, 4), dtype=torch.int8)
    assert torch.equal(int8_kernels.int8_mm(a, b), a.long() @ b.long())
    assert int8_kernels.int8_mm(a, b).dtype == torch.int32


def _dynamic_reference(x2d, layer):
    """torch.ao's dynamic Linear from its definition, per group: the group's input quantized per call to
    7-bit unsigned with a zero point (torch.quantize_per_tensor_dynamic, reduce_range as torch.ao's Linear
    passes it), the layer's int8 weights, integer products in float64, rescaled."""
    groups, out_g, in_g = layer.weight_int8.shape
    outs = []
    for i, xi in enumerate(x2d.float().chunk(groups, -1)):
        qx = torch.quantize_per_tensor_dynamic(xi.contiguous(), torch.quint8, True)
        x_int = qx.int_repr().double() - qx.q_zero_point()
        products = x_int @ layer.weight_int8[i].double().T
        y = products * qx.q_scale() * layer.weight_scale[i].double()
        outs.append(y + layer.bias[i * out_g:(i + 1) * out_g].double() if layer.bias is not None else y)
    return torch.cat(outs, -1)


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1x1"])
@pytest.mark.parametrize("bias", [True, False])
def test_dynamic_layer_is_torch_ao_dynamic_linear_per_group(conv, bias):
    """The torch.ao route's layer: the same int8 weights as Int8BlockDiagonalLinear, each group through torch.ao's
    own dynamic Linear (bit for bit) and close to a re-computation from the definition."""
    layer = _float_layer(conv, 64, 96, 4, bias)
    qlayer = Q.DYNAMIC_INT8_MODULES[type(layer)].from_float(layer)
    assert torch.equal(qlayer.weight_int8, Q.INT8_MODULES[type(layer)].from_float(layer).weight_int8)
    if conv:
        x = torch.randn(2, 64, 5, 3)
        x2d = x.permute(0, 2, 3, 1).reshape(-1, 64)
    else:
        x = torch.randn(3, 7, 64) * torch.rand(3, 7, 1) * 4
        x2d = x.reshape(-1, 64)
    y = qlayer(x)
    assert y.shape == layer(x).shape and y.dtype == x.dtype
    y2d = y.permute(0, 2, 3, 1).reshape(-1, 96) if conv else y.reshape(-1, 96)
    assert _rel(_dynamic_reference(x2d, qlayer), y2d) < 1e-5

    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    per_group = []
    for i, xi in enumerate(x2d.chunk(4, -1)):
        ao = DynamicLinear(16, 24, bias_=bias)
        qweight = torch._make_per_channel_quantized_tensor(
            qlayer.weight_int8[i], qlayer.weight_scale[i].double(), torch.zeros(24, dtype=torch.long), 0)
        ao.set_weight_bias(qweight, layer.bias.detach()[i * 24:(i + 1) * 24] if bias else None)
        per_group.append(ao(xi.contiguous()))
    assert torch.equal(torch.cat(per_group, -1), y2d)
    with torch.no_grad():
        rel = float((y - layer(x)).norm() / layer(x).norm())
    assert rel < 0.03, rel  # measured 0.7%


def test_dynamic_layer_repacks_when_its_weights_change(monkeypatch):
    layer, other = BlockDiagonalLinear(32, 48, 4), BlockDiagonalLinear(32, 48, 4)
    qlayer = Q.DynamicInt8BlockDiagonalLinear.from_float(layer)
    qother = Q.DynamicInt8BlockDiagonalLinear.from_float(other)
    x = torch.randn(6, 32)
    y = qlayer(x)
    for copied in (copy.deepcopy(qlayer), pickle.loads(pickle.dumps(qlayer))):
        assert torch.equal(copied(x), y)
    qlayer.load_state_dict(qother.state_dict())  # packed weights are not state: rebuilt from the loaded buffers
    assert torch.equal(qlayer(x), qother(x)) and not torch.equal(qlayer(x), y)
    assert set(qlayer.state_dict()) == {"weight_int8", "weight_scale", "bias"}
    # where torch.ao's op cannot run (another device), the layer runs the per-token int8 kernel
    monkeypatch.setattr(int8_layers, "dynamic_gemm_ok", lambda x: False)
    assert torch.equal(qlayer(x), Q.Int8BlockDiagonalLinear.from_float(other)(x))


@pytest.mark.parametrize("modules", ["INT8_MODULES", "DYNAMIC_INT8_MODULES"])
@pytest.mark.parametrize("options", [{}, {"channel_shuffle": True}, {"gated": True}, {"use_conv": True},
                                     {"use_conv": True, "channel_shuffle": True}],
                         ids=["plain", "shuffle", "gated", "conv", "conv-shuffle"])
def test_int8_mixer_kernel_is_the_two_int8_layers(options, modules):
    """Int8SchemeMlp's kernels compute what its two int8 layers compute one after the other."""
    mixer = SchemeMlp(32, 128, groups=4, cca=False, **options).eval()
    qmixer = copy.deepcopy(mixer)
    qmixer.fc1 = getattr(Q, modules)[type(mixer.fc1)].from_float(mixer.fc1)
    qmixer.fc2 = getattr(Q, modules)[type(mixer.fc2)].from_float(mixer.fc2)
    assert Q.convert_int8_mixers(qmixer) == 1 and type(qmixer) is Q.Int8SchemeMlp
    x = torch.randn(2, 32, 5, 7) if options.get("use_conv") else torch.randn(3, 50, 32)
    with torch.no_grad():
        fused = qmixer(x)
        layered = qmixer.fc2(qmixer.fc2_input(x))
        y = mixer(x)
    assert torch.equal(fused, layered)
    # measured: per-token activations 0.9%, torch.ao's per-call 7-bit ones 1.7-2.1% (gated 4.7%)
    assert float((fused - y).norm() / y.norm()) < (0.02 if modules == "INT8_MODULES" else 0.07)


def _float_layers(model):
    return [name for name, m in model.named_modules() if type(m) in FLOAT_TYPES
            and not (type(m) is nn.Linear and type(m.weight).__name__ == "Int8Tensor")]


@pytest.mark.parametrize("entry", list(QUANTIZE_ENTRY_POINTS))
def test_entry_points_quantize_every_linear_layer(entry):
    if entry == "torchao" and not HAS_TORCHAO:
        pytest.skip("torchao is not installed")
    quantize, bound = QUANTIZE_ENTRY_POINTS[entry]
    model = fused_deit()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        quantized = quantize(model)
        out = quantized(x)
    # every projection, the classifier included: both libraries quantize it by default, and the digits test
    # below shows it costs no accuracy there
    assert _float_layers(quantized) == []
    assert sum(isinstance(m, Q.Int8BlockDiagonalLinear) for m in quantized.modules()) == 4
    # torch.ao's route runs torch.ao's dynamic Linear per group, torchao's the per-token int8 layers
    dynamic = sum(isinstance(m, Q.DynamicInt8BlockDiagonalLinear) for m in quantized.modules())
    assert dynamic == (4 if entry == "torch.ao" else 0)
    assert all(type(m) is Q.Int8SchemeMlp for m in timm_scheme.scheme_mixers(quantized).values())
    assert len(_float_layers(model)) == 4 + 4 + 1  # the float model is left as it was
    rel = float((out - ref).norm() / ref.norm())
    print(f"{entry}: relative logit error {rel:.4f}")
    assert rel < bound

    # linear=False: only the block-diagonal layers, nn.Linear left float
    with torch.no_grad():
        partial = quantize(model, linear=False)
        rel_bd = float((partial(x) - ref).norm() / ref.norm())
    assert sorted(_float_layers(partial)) == sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)
    assert rel_bd < (0.05 if entry == "torch.ao" else 0.03)


def test_torchao_config_and_handler():
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_
    config = Q.BlockDiagonalInt8Config()
    assert type(pickle.loads(pickle.dumps(config))) is Q.BlockDiagonalInt8Config
    layers = nn.Sequential(BlockDiagonalLinear(16, 32, 4), nn.GELU(), BlockDiagonalLinear(32, 16, 4))
    x = torch.randn(5, 16)
    with torch.no_grad():
        ref = layers(x)
        quantize_(layers, config, filter_fn=Q.is_block_diagonal)
        assert [type(m) for m in layers] == [Q.Int8BlockDiagonalLinear, nn.GELU, Q.Int8BlockDiagonalLinear]
        assert float((layers(x) - ref).norm() / ref.norm()) < 0.03
    with pytest.raises(TypeError, match="is_block_diagonal"):  # the config on a layer it does not know
        quantize_(nn.Sequential(nn.Linear(4, 4)), config)


def test_digits_accuracy_survives_int8():
    """A tiny SCHEME ViT trained on digits (about 15 s on one thread), fused, quantized both ways. Over training
    seeds 0-4 (examples/int8_digits.py, examples/results/int8_digits.md): fused fp32 95.5-96.9% top-1; int8 loses at
    most 0.45 points (2 images in 449) through torch.ao and 0.22 (1 image) through torchao."""
    model, x_test, y_test = train_digits()

    def top1(m):
        with torch.no_grad():
            return float((m(x_test).argmax(-1) == y_test).float().mean()) * 100

    with torch.no_grad():
        logits = model(x_test)
    base = top1(model)
    assert base > 90
    figures = {"fp32": base}
    for entry, (quantize, _) in QUANTIZE_ENTRY_POINTS.items():
        if entry == "torchao" and not HAS_TORCHAO:
            continue
        quantized = quantize(model)
        figures[entry] = top1(quantized)
        with torch.no_grad():
            rel = float((quantized(x_test) - logits).norm() / logits.norm())
        print(f"digits {entry}: top-1 {figures[entry]:.2f} (fp32 {base:.2f}), relative logit error {rel:.4f}")
        assert base - figures[entry] <= 1.5, figures
        assert rel < 0.05


def test_refuses_a_model_that_is_not_fused():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                              depth=2)
    timm_scheme.scheme_patch(model, groups=4, expansion=8, cca=True)
    model.eval()
    for quantize in (Q.quantize_dynamic_int8, Q.quantize_int8):
        with pytest.raises(ValueError, match=r"'blocks\.0\.mlp'.*CCA.*fuse_for_inference"):
            quantize(model)
    assert len(_float_layers(model)) == 4 + 4 + 1  # refused before changing anything
    # a mixer with CCA whose projections someone swapped by hand is refused too
    mixer = timm_scheme.scheme_mixers(model)["blocks.0.mlp"]
    mixer.fc1 = Q.Int8BlockDiagonalLinear.from_float(mixer.fc1)
    with pytest.raises(ValueError, match="CCA"):
        Q.convert_int8_mixers(model)


def test_bad_layers_are_refused():
    with pytest.raises(TypeError, match="BlockDiagonalLinear"):
        Q.Int8BlockDiagonalLinear.from_float(nn.Linear(8, 8))
    with pytest.raises(TypeError, match="BlockDiagonalConv1x1"):
        Q.Int8BlockDiagonalConv1x1.from_float(BlockDiagonalLinear(8, 8, 2))
    with pytest.raises(ValueError, match="groups=3"):
        Q.Int8BlockDiagonalLinear(8, 8, 3)
    layer = BlockDiagonalLinear(8, 8, 2)
    layer.qconfig = torch.ao.quantization.float16_dynamic_qconfig
    with pytest.raises(ValueError, match="int8"):
        Q.Int8BlockDiagonalLinear.from_float(layer)
    zeros = Q.Int8BlockDiagonalLinear(8, 8, 2, bias=False)
    assert torch.equal(zeros(torch.zeros(3, 8)), torch.zeros(3, 8))  # all-zero tokens: no 0/0
