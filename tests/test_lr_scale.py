"""block_lr_power: optimizer steps on block-diagonal weights are those of a learning rate scaled by
(dense fan-in / block fan-in) ** power, checked against torch's own per-group learning rates."""
import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from timm_scheme import SchemeConfig, fuse_for_inference, scheme_patch
from timm_scheme.io import save_pretrained
from timm_scheme.layers import BlockDiagonalLinear
from timm_scheme.patch import patch_structure

from .test_adapters import TinyNet, registered  # noqa: F401  (the adapters of the user's own MLP classes)

pytestmark = pytest.mark.usefixtures("one_thread")
LR, DECAY = 1e-3, 0.05


def dense_vit():
    # no qkv bias: the key bias gets a gradient of rounding noise only (softmax ignores it), which Adam scales to
    # full steps, so two equal computations summed in another order would part there
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=3, qkv_bias=False)


def independent_scales(dense, power):
    """weight name -> scale, from the dense model's own widths: fc1 reads all `dim` channels where a block reads
    dim / 4; dense fc2 reads its 4 * dim hidden units where a block reads 8 * dim / 4."""
    scales = {}
    for i, block in enumerate(dense.blocks):
        dim, hidden = block.mlp.fc1.in_features, block.mlp.fc1.out_features
        scales[f"blocks.{i}.mlp.fc1.weight"] = (dim / (dim / 4)) ** power
        scales[f"blocks.{i}.mlp.fc2.weight"] = (hidden / (8 * dim / 4)) ** power
    return scales


def train(model, optimizer, steps=3):
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 3, (4,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


OPTIMIZERS = {
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=LR, weight_decay=DECAY),
    "sgd_momentum": lambda groups: torch.optim.SGD(groups, lr=LR * 100, momentum=0.9, weight_decay=DECAY),
}


@pytest.mark.parametrize("name, power, copied", [("adamw", 0.5, False), ("adamw", 1.0, True),
                                                  ("sgd_momentum", 1.0, False)])
def test_steps_equal_a_learning_rate_scaled_by_the_fan_in_ratio(name, power, copied):
    torch.manual_seed(0)
    dense = dense_vit()
    scaled = scheme_patch(copy.deepcopy(dense), groups=4, expansion=8, block_lr_power=power)
    if copied:  # a copy of a patched model (deepcopy, pickle) steps like the model it copies
        scaled = copy.deepcopy(scaled)
    reference = scheme_patch(copy.deepcopy(dense), groups=4, expansion=8)
    plain = scheme_patch(copy.deepcopy(dense), groups=4, expansion=8)
    reference.load_state_dict(scaled.state_dict())
    plain.load_state_dict(scaled.state_dict())
    make = OPTIMIZERS[name]
    base_lr = make([torch.zeros(1, requires_grad=True)]).defaults["lr"]
    scales = independent_scales(dense, power)
    named = dict(reference.named_parameters())
    groups = [{"params": [p for n, p in named.items() if n not in scales]}]
    groups += [{"params": [named[n]], "lr": base_lr * s} for n, s in scales.items()]

    train(scaled, make(scaled.parameters()))
    train(reference, make(groups))
    train(plain, make(plain.parameters()))

    for key, value in reference.state_dict().items():
        torch.testing.assert_close(scaled.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    moved_more = [key for key in scales
                  if not torch.allclose(plain.state_dict()[key], scaled.state_dict()[key], atol=1e-7)]
    assert moved_more == list(scales)  # the stretch did something: the unscaled steps land elsewhere


def test_only_steps_that_update_the_weight_are_stretched():
    torch.manual_seed(0)
    model = scheme_patch(dense_vit(), groups=4, expansion=8, block_lr_power=1.0)
    fc1 = model.blocks[0].mlp.fc1
    assert isinstance(fc1, BlockDiagonalLinear) and fc1.lr_scale == 4.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, torch.optim.AdamW(model.head.parameters(), lr=LR))  # an optimizer for the head alone
    assert torch.equal(fc1.weight, before["blocks.0.mlp.fc1.weight"])
    assert not torch.equal(model.head.weight, before["head.weight"])
    model.blocks[1].mlp.fc2.weight.requires_grad_(False)                # a frozen block-diagonal weight
    train(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR), steps=1)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, before["blocks.1.mlp.fc2.weight"])
    step = (fc1.weight.detach() - before["blocks.0.mlp.fc1.weight"]).abs().max()
    assert 0 < float(step) <= 4 * LR * 1.01  # one AdamW step of at most lr per weight, stretched 4x


def test_the_scale_follows_the_config_through_a_reload():
    torch.manual_seed(0)
    model = scheme_patch(dense_vit(), groups=4, expansion=8, block_lr_power=0.5, block_multiplier_power=1.0)
    config = SchemeConfig.from_dict(model.scheme_config.to_dict())
    reloaded = patch_structure(dense_vit(), config)
    scales = {n: m.lr_scale for n, m in model.named_modules() if isinstance(m, BlockDiagonalLinear)}
    assert {n: m.lr_scale for n, m in reloaded.named_modules() if isinstance(m, BlockDiagonalLinear)} == scales
    multipliers = {n: m.multiplier for n, m in reloaded.named_modules() if isinstance(m, BlockDiagonalLinear)}
    assert multipliers.keys() == scales.keys()
    assert all(math.isclose(multipliers[n], s ** 2) for n, s in scales.items())  # power 1 against 0.5
    assert scales["blocks.0.mlp.fc1"] == 2.0 and math.isclose(scales["blocks.0.mlp.fc2"], 2 ** 0.5)
    default = scheme_patch(dense_vit(), groups=4, expansion=8)
    assert {m.lr_scale for m in default.modules() if isinstance(m, BlockDiagonalLinear)} == {1.0}


def test_adapted_layers_scale_like_timms(registered):
    model = scheme_patch(TinyNet(dim=32, hidden=64), groups=4, expansion=4, block_lr_power=1.0)
    own, gated = model.mlp1.inner, model.mlp2.inner
    # a first projection reads 32 channels where a block reads 8; the last reads the dense 64 hidden units where a
    # block reads 128 / 4
    assert (own.proj_in.lr_scale, gated.gate.lr_scale, gated.up.lr_scale) == (4.0, 4.0, 4.0)
    assert (own.proj_out.lr_scale, gated.down.lr_scale) == (2.0, 2.0)
    loud = scheme_patch(TinyNet(dim=32, hidden=64), groups=4, expansion=4, block_multiplier_power=1.0)
    own, gated = loud.mlp1.inner, loud.mlp2.inner
    assert (own.proj_in.multiplier, gated.gate.multiplier, own.proj_out.multiplier) == (4.0, 4.0, 2.0)


@pytest.mark.parametrize("power", [-0.5, 3, float("nan"), True, "1"])
def test_bad_power_is_refused_naming_the_option(power):
    with pytest.raises(ValueError, match="block_lr_power"):
        scheme_patch(dense_vit(), groups=4, expansion=8, block_lr_power=power)


# --- block_multiplier_power: steps as under an output multiplier, checked against torch's parametrize ----------

class _Times(torch.nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, v):
        return v * self.factor


@pytest.mark.parametrize("name, power, copied", [("adamw", 0.5, False), ("adamw", 1.0, True),
                                                  ("sgd_momentum", 0.5, False)])
def test_steps_equal_those_under_an_output_multiplier(name, power, copied):
    """The reference holds V = W / m and computes the weight as m * V through torch.nn.utils.parametrize, so the
    optimizer steps on V with the gradient the multiplier gives: what the patched model must do with no
    parametrization at all."""
    torch.manual_seed(0)
    dense = dense_vit()
    scaled = scheme_patch(copy.deepcopy(dense), groups=4, expansion=8, block_multiplier_power=power)
    if copied:
        scaled = copy.deepcopy(scaled)
    plain = scheme_patch(copy.deepcopy(dense), groups=4, expansion=8)
    plain.load_state_dict(scaled.state_dict())
    reference = scheme_patch(copy.deepcopy(dense), groups=4, expansion=8)
    reference.load_state_dict(scaled.state_dict())
    multipliers = independent_scales(dense, power)
    for key, m in multipliers.items():
        layer = reference.get_submodule(key.rsplit(".", 1)[0])
        with torch.no_grad():
            layer.weight.div_(m)
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", _Times(m))

    train(scaled, OPTIMIZERS[name](scaled.parameters()))
    train(reference, OPTIMIZERS[name](reference.parameters()))
    train(plain, OPTIMIZERS[name](plain.parameters()))

    got, plain_state = scaled.state_dict(), plain.state_dict()
    for key, value in reference.named_parameters():
        key = key.replace(".parametrizations.weight.original", ".weight")
        expected = value.detach() * multipliers[key] if key in multipliers else value.detach()
        torch.testing.assert_close(got[key], expected, rtol=1e-5, atol=1e-6, msg=key)
    moved_otherwise = [key for key in multipliers if not torch.allclose(plain_state[key], got[key], atol=1e-7)]
    assert moved_otherwise == list(multipliers)  # without the multiplier the steps land elsewhere


def test_the_multiplier_scales_the_start_and_leaves_gradients_as_the_loss_gave_them():
    torch.manual_seed(0)
    dense = dense_vit()
    torch.manual_seed(1)
    plain = scheme_patch(copy.deepcopy(dense), groups=4, expansion=8)
    torch.manual_seed(1)
    loud = scheme_patch(copy.deepcopy(dense), groups=4, expansion=8, block_multiplier_power=0.5)
    for key, m in independent_scales(dense, 0.5).items():
        # same draws, m times larger: fc1 reads 4x the channels of a block (m = 2), fc2 2x (m = 1.41)
        torch.testing.assert_close(loud.state_dict()[key], plain.state_dict()[key] * m)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    F.cross_entropy(loud(x), y).backward()
    grads = {n: p.grad.clone() for n, p in loud.named_parameters()}
    torch.optim.AdamW(loud.head.parameters(), lr=LR).step()  # a step that does not hold the blocks
    optimizer = torch.optim.AdamW(loud.parameters(), lr=LR)
    optimizer.step()
    for n, p in loud.named_parameters():  # (times m, then divided by it: equal up to one rounding)
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-6, atol=0, msg=n)
    fc1 = loud.blocks[0].mlp.fc1
    assert fc1.multiplier == 2.0 and {m.multiplier for m in plain.modules() if hasattr(m, "multiplier")} == {1.0}


@pytest.mark.parametrize("power", [-0.5, 3, float("nan"), True, "1"])
def test_bad_multiplier_power_is_refused_naming_the_option(power):
    with pytest.raises(ValueError, match="block_multiplier_power"):
        scheme_patch(dense_vit(), groups=4, expansion=8, block_multiplier_power=power)


def test_a_trained_model_under_a_multiplier_fuses_saves_and_loads_as_it_computes(tmp_path):
    """The multiplier lives in the optimizer steps only: the fused export loaded by timm computes what the trained
    model's eval forward did, with no factor applied twice on the way."""
    torch.manual_seed(0)
    model = scheme_patch(dense_vit(), groups=4, expansion=8, block_multiplier_power=0.5)
    train(model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=DECAY))
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        before = model(x)
    fuse_for_inference(model, x)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'ckpt'}", pretrained=True).eval()
    assert loaded.scheme_config.block_multiplier_power == 0.5
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), before, rtol=1e-5, atol=1e-5)


def test_a_run_stopped_and_resumed_under_a_multiplier_repeats_the_uninterrupted_one():
    """The hooks keep no state: model and optimizer state dicts (what timm's --resume restores) carry it all."""
    torch.manual_seed(0)
    dense = dense_vit()
    start = scheme_patch(copy.deepcopy(dense), groups=4, expansion=8, block_multiplier_power=0.5)
    batches = [(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)), torch.tensor([0, 1, 2, 0]))
               for i in range(4)]

    def steps(model, optimizer, chosen):
        for x, y in chosen:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    straight = copy.deepcopy(start)
    steps(straight, torch.optim.AdamW(straight.parameters(), lr=LR, weight_decay=DECAY), batches)
    first = copy.deepcopy(start)
    optimizer = torch.optim.AdamW(first.parameters(), lr=LR, weight_decay=DECAY)
    steps(first, optimizer, batches[:2])
    saved = copy.deepcopy({"model": first.state_dict(), "optimizer": optimizer.state_dict()})
    resumed = scheme_patch(copy.deepcopy(dense), groups=4, expansion=8, block_multiplier_power=0.5)
    resumed.load_state_dict(saved["model"])
    optimizer = torch.optim.AdamW(resumed.parameters(), lr=LR, weight_decay=DECAY)
    optimizer.load_state_dict(saved["optimizer"])
    steps(resumed, optimizer, batches[2:])
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_converted_dense_weights_are_kept_as_they_are_under_a_multiplier():
    """init="dense" converts the pretrained function: those are the weights the forward uses, not a start to
    scale."""
    torch.manual_seed(0)
    dense = dense_vit()
    converted = scheme_patch(copy.deepcopy(dense), groups=4, expansion=4, init="dense")
    loud = scheme_patch(copy.deepcopy(dense), groups=4, expansion=4, init="dense", block_multiplier_power=0.5)
    assert loud.blocks[0].mlp.fc1.multiplier == 2.0
    for key, value in converted.state_dict().items():
        assert torch.equal(loud.state_dict()[key], value), key


def test_a_step_with_a_closure_is_refused_under_a_multiplier_before_it_moves_anything():
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])

    def lbfgs_and_closure(model):
        optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2)

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        return optimizer, closure

    model = scheme_patch(dense_vit(), groups=4, expansion=8, block_multiplier_power=0.5)
    optimizer, closure = lbfgs_and_closure(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):  # with no gradients yet (LBFGS computes them in the closure), then with them
        with pytest.raises(ValueError, match="block_multiplier_power.*closure|closure.*block_multiplier_power"):
            optimizer.step(closure)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        closure()
    optimizer, closure = lbfgs_and_closure(scheme_patch(dense_vit(), groups=4, expansion=8))
    optimizer.step(closure)  # without a multiplier a closure is fine
