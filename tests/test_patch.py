"""scheme_patch and fuse_for_inference on timm models, against timm's own modules and outputs."""
import copy
import logging

import pytest
import timm
import torch
from timm.layers.mlp import ConvMlp, GluMlp, Mlp, SwiGLU
from torch import nn

import timm_scheme
from timm_scheme import SchemeMlp, cca_in_eval, cca_weights, find_mlps, fuse_for_inference
from timm_scheme import scheme_patch as _scheme_patch
from timm_scheme import scheme_mixers

from .models import ARCHITECTURES, create, example_input


def scheme_patch(model, *args, **options):
    """These tests exercise SCHEME with its CCA branch (off by default): mixing weights, folding alpha, fusing."""
    return _scheme_patch(model, *args, **{"cca": True, **options})


def copy_dense_weights(original: nn.Module, new: SchemeMlp) -> None:
    """Load a dense timm MLP into a groups=1 SchemeMlp of the same width (fc1 packs [first | second] half)."""
    def flat(w):
        return w.reshape(w.shape[0], -1)
    if isinstance(original, SwiGLU):  # act(gate) * value: first half is the gate
        w1 = torch.cat([original.fc1_g.weight, original.fc1_x.weight])
        b1 = torch.cat([original.fc1_g.bias, original.fc1_x.bias]) if original.fc1_g.bias is not None else None
    else:
        w1, b1 = flat(original.fc1.weight), original.fc1.bias
    with torch.no_grad():
        new.fc1.weight.copy_(w1.reshape(1, *w1.shape[:2]))
        new.fc2.weight.copy_(flat(original.fc2.weight).unsqueeze(0))
        for ours, theirs in ((new.fc1.bias, b1), (new.fc2.bias, original.fc2.bias)):
            if theirs is not None:
                ours.copy_(theirs)
        if not isinstance(original.norm, nn.Identity):
            new.norm.load_state_dict(original.norm.state_dict())


@pytest.mark.parametrize("key", list(ARCHITECTURES))
def test_dense_equivalent_patch_reproduces_timm_model(key):
    """groups=1, original width, no CCA, timm's weights copied in: the output must be timm's own."""
    reference = create(key).eval()
    model = copy.deepcopy(reference)
    originals = dict(find_mlps(reference))
    scheme_patch(model, groups=1, expansion=None, cca=False)
    mixers = timm_scheme.scheme_mixers(model)
    assert set(mixers) == set(originals) and mixers
    for name, mixer in mixers.items():
        copy_dense_weights(originals[name], mixer)
    x = example_input(key)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", list(ARCHITECTURES))
def test_train_step_then_eval_then_fuse_is_exact(key):
    model = create(key)
    originals = dict(find_mlps(model))
    head = model.get_classifier()
    scheme_patch(model, groups=4, expansion=8)
    mixers = timm_scheme.scheme_mixers(model)
    assert set(mixers) == set(originals)
    assert model.get_classifier() is head  # heads are never touched
    for name, mixer in mixers.items():
        orig = originals[name]
        assert type(mixer.act) is type(orig.act)
        assert mixer.fc1.in_features == (orig.fc1_x if isinstance(orig, SwiGLU) else orig.fc1).weight.shape[1]
        assert mixer.fc2.out_features == orig.fc2.weight.shape[0]
        assert mixer.hidden_features == 8 * mixer.fc1.in_features
        assert mixer.gated == isinstance(orig, (GluMlp, SwiGLU))
        assert mixer.use_conv == isinstance(getattr(orig, "fc1", None), nn.Conv2d)
        assert (mixer.fc2.bias is None) == (orig.fc2.bias is None)

    x, y = example_input(key, batch=4), torch.tensor([1, 2, 3, 4])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    model.train()
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        assert all(m.mix_logits.grad is not None for m in mixers.values())
        optimizer.step()
    weights = cca_weights(model)
    assert set(weights) == set(mixers) and all(abs(w - 0.5) > 1e-4 for w in weights.values())  # all learnt

    model.eval()
    with torch.no_grad():
        unfused = model(x)
    with pytest.warns(UserWarning, match="discarded a CCA weight above"):
        assert fuse_for_inference(model, x) is model
    with torch.no_grad():
        fused = model(x)
    assert float((fused - unfused).abs().max() / unfused.abs().max()) <= 1e-5
    keys = model.state_dict().keys()
    assert not [k for k in keys if "mix_logits" in k or "cca" in k]
    report = model.scheme_fuse_report
    assert report.cca_weights == pytest.approx(weights) and report.relative_output_change > 0


def test_mixed_layout_model_gets_both_kernels():
    model = create("caformer_s18")
    scheme_patch(model)
    layouts = {m.use_conv for m in timm_scheme.scheme_mixers(model).values()}
    assert layouts == {True, False}


def test_activation_parameters_are_kept():
    model = create("poolformerv2_s12")
    originals = dict(find_mlps(model))
    with torch.no_grad():
        for m in originals.values():
            m.act.scale.fill_(1.7)
    scheme_patch(model)
    for name, mixer in timm_scheme.scheme_mixers(model).items():
        assert mixer.act is not originals[name].act and float(mixer.act.scale.detach()) == pytest.approx(1.7)
        assert mixer.act.scale.requires_grad


def test_hidden_norm_is_resized_and_dropout_kept():
    model = create("eva02_tiny_patch14_224.swiglu", proj_drop_rate=0.1)
    scheme_patch(model, groups=4, expansion=2)
    mixer = next(iter(timm_scheme.scheme_mixers(model).values()))
    assert isinstance(mixer.norm, nn.LayerNorm) and mixer.norm.normalized_shape == (2 * 192,)
    assert mixer.drop2.p == pytest.approx(0.1)


def test_expansion_none_keeps_widths():
    model = create("deit_tiny_patch16_224")
    scheme_patch(model, groups=4, expansion=None)
    assert {m.hidden_features for m in timm_scheme.scheme_mixers(model).values()} == {4 * 192}


def test_filter_fn_narrows_the_choice():
    model = create("deit_tiny_patch16_224")
    seen = []

    def only_first_blocks(module, name):
        seen.append(type(module))
        return name in ("blocks.0.mlp", "blocks.1.mlp")
    scheme_patch(model, filter_fn=only_first_blocks)
    assert set(timm_scheme.scheme_mixers(model)) == {"blocks.0.mlp", "blocks.1.mlp"}
    assert set(seen) == {Mlp} and isinstance(model.blocks[2].mlp, Mlp)


def test_features_only_model_patches_and_fuses():
    model = timm.create_model("caformer_s18", pretrained=False, features_only=True, out_indices=(1, 3))
    scheme_patch(model, groups=2, expansion=4)
    model.train()
    x = torch.randn(2, 3, 64, 64)
    sum(f.sum() for f in model(x)).backward()
    model.eval()
    with torch.no_grad():
        before = model(x)
        fuse_for_inference(model, x, warn_threshold=1.0)
        after = model(x)
    assert [f.shape for f in before] == [f.shape for f in after] == [(2, 128, 8, 8), (2, 512, 2, 2)]
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip():
    model = scheme_patch(create("deit_tiny_patch16_224"), alpha_init=0.8)
    x = example_input("deit_tiny_patch16_224")
    twin = scheme_patch(create("deit_tiny_patch16_224"), alpha_init=0.8)
    twin.load_state_dict(model.state_dict())
    model.eval(), twin.eval()
    with torch.no_grad(), cca_in_eval(model), cca_in_eval(twin):
        torch.testing.assert_close(model(x), twin(x), rtol=0, atol=0)
    fuse_for_inference(model, warn_threshold=1.0)
    fused_twin = scheme_patch(create("deit_tiny_patch16_224"), alpha_init=0.8)
    fuse_for_inference(fused_twin, warn_threshold=1.0)
    fused_twin.load_state_dict(model.state_dict())  # strict: same keys and shapes once fused
    with torch.no_grad():
        torch.testing.assert_close(model(x), fused_twin.eval()(x), rtol=0, atol=0)


def test_timm_reparameterize_model_fuses_a_scheme_model():
    model = scheme_patch(create("poolformer_s12"), alpha_init=0.3).eval()
    x = example_input("poolformer_s12")
    fused = timm.utils.reparameterize_model(model)  # timm's own tooling, a fused copy
    assert not [k for k in fused.state_dict() if "mix_logits" in k or "cca" in k]
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_bf16_model_patches_in_its_dtype_and_runs_under_autocast():
    model = create("deit_tiny_patch16_224", depth=2).to(torch.bfloat16)
    scheme_patch(model)
    mixer = model.blocks[0].mlp
    assert mixer.fc1.weight.dtype == torch.bfloat16
    out = model.train()(example_input("deit_tiny_patch16_224").bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    model32 = scheme_patch(create("deit_tiny_patch16_224", depth=2)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model32(example_input("deit_tiny_patch16_224"))
    out.float().sum().backward()
    assert torch.isfinite(model32.blocks[0].mlp.mix_logits.grad).all()


def test_cca_skipped_where_widths_differ(caplog):
    """An MLP whose out width differs from its in width runs without CCA, and says so."""
    model = nn.Sequential(Mlp(16, 64, 32), Mlp(32, 64))
    with caplog.at_level(logging.WARNING, logger="timm_scheme"):
        scheme_patch(model, groups=4, expansion=2)
    assert "these layers run without it: ['0']" in caplog.text
    assert not model[0].has_cca and model[1].has_cca and model[0].fc2.out_features == 32


# --- bad input -----------------------------------------------------------------------------------

def test_groups_not_dividing_widths_names_layer_and_alternatives():
    model = create("deit_tiny_patch16_224")
    with pytest.raises(ValueError, match=r"groups=5 does not divide in_features=192 of layer 'blocks.0.mlp'.*"
                                         r"\[1, 2, 3, 4, 6, 8"):
        scheme_patch(model, groups=5)
    assert isinstance(model.blocks[0].mlp, Mlp) and not hasattr(model, "scheme_config")  # nothing changed


@pytest.mark.parametrize("expansion", [0, -1, float("nan"), "8"])
def test_bad_expansion(expansion):
    with pytest.raises(ValueError, match="expansion="):
        scheme_patch(create("deit_tiny_patch16_224"), expansion=expansion)


def test_hidden_width_not_divisible_by_groups():
    model = create("deit_tiny_patch16_224")
    with pytest.raises(ValueError, match=r"hidden width 1 of layer 'blocks.0.mlp'.*not a positive multiple of groups=4"):
        scheme_patch(model, groups=4, expansion=1 / 192)
    assert isinstance(model.blocks[0].mlp, Mlp)


@pytest.mark.parametrize("groups", [0, 2.5, True])
def test_bad_groups_value(groups):
    with pytest.raises(ValueError, match="groups="):
        scheme_patch(create("deit_tiny_patch16_224"), groups=groups)


def test_unknown_option():
    with pytest.raises(ValueError, match=r"unknown SCHEME option\(s\) \['cca_scael'\]"):
        scheme_patch(create("deit_tiny_patch16_224"), cca_scael="hidden")


def test_model_without_mlp():
    with pytest.raises(ValueError, match="found no MLP to patch in ResNet"):
        scheme_patch(timm.create_model("resnet18", pretrained=False))
    with pytest.raises(ValueError, match="found no MLP to patch"):
        scheme_patch(create("deit_tiny_patch16_224"), filter_fn=lambda m, n: False)


def test_patched_twice():
    model = scheme_patch(create("deit_tiny_patch16_224"))
    with pytest.raises(ValueError, match="already patched"):
        scheme_patch(model)


def test_fusing_twice_is_a_no_op_and_unpatched_model_is_refused():
    model = scheme_patch(create("deit_tiny_patch16_224")).eval()
    fuse_for_inference(model, warn_threshold=1.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_for_inference(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="has no SCHEME mixers; call timm_scheme.scheme_patch"):
        fuse_for_inference(create("deit_tiny_patch16_224"))


def test_fuse_warning_names_layers_above_threshold_only():
    model = scheme_patch(create("deit_tiny_patch16_224"), fuse_warn_threshold=0.2)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            block.mlp.mix_logits.copy_(torch.tensor([0.0, -10.0 if i else 0.0]))
    with pytest.warns(UserWarning, match=r"1 layer\(s\) discarded a CCA weight above 0.2: blocks.0.mlp \(0.5\)\."):
        fuse_for_inference(model)
    assert model.scheme_fuse_report.above_threshold == ["blocks.0.mlp"]


def test_mlp_mixer_token_mlps_are_left_alone():
    model = timm.create_model("mixer_s16_224", pretrained=False, num_classes=10)
    scheme_patch(model, groups=4, expansion=4)
    names = set(scheme_mixers(model))
    assert names and all(n.endswith("mlp_channels") for n in names)
    assert isinstance(model.blocks[0].mlp_tokens, Mlp)


def test_a_bare_mlp_is_refused_with_a_pointer():
    with pytest.raises(ValueError, match="the model itself is a Mlp.*SchemeMlp directly"):
        scheme_patch(Mlp(16, 64))


def test_mlps_inside_attention_or_position_bias_are_not_channel_mixers():
    swin_cr = timm.create_model("swinv2_cr_tiny_224", pretrained=False)
    relpos = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, img_size=32)
    cait = timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, depth=1)
    for model, mixers in ((swin_cr, 12), (relpos, 12), (cait, 3)):  # cait: 1 block + 2 class-attention blocks
        names = [n for n, _ in find_mlps(model)]
        assert len(names) == mixers and all(n.endswith(".mlp") for n in names), names
        assert not [n for n in names if ".attn." in n]
