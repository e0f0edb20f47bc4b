"""SCHEMEformer in timm's registry, and SCHEME models as feature backbones."""
import pytest
import timm
import torch

import timm_scheme  # noqa: F401  (importing it registers the SCHEMEformer family)
from timm_scheme import SchemeConfig, SchemeMlp, fuse_for_inference, scheme_patch

S12 = ["schemeformer_ppaa_s12_224", "schemeformer_ppaa_s12_g2_224", "schemeformer_ppaa_s12_g8_224"]
S24 = ["schemeformer_ppaa_s24_224", "schemeformer_ppaa_s24_g2_224", "schemeformer_ppaa_s24_g8_224"]
S36 = ["schemeformer_ppaa_s36_224", "schemeformer_ppaa_s36_g2_224", "schemeformer_ppaa_s36_g8_224"]
GROUPS = {name: g for names in (S12, S24, S36) for name, g in zip(names, (4, 2, 8))}
DEPTHS = {"s12": (2, 2, 6, 2), "s24": (4, 4, 12, 4), "s36": (6, 6, 18, 6)}
WIDTHS = (64, 128, 320, 512)


pytestmark = pytest.mark.filterwarnings("ignore:fuse_for_inference:UserWarning")


@pytest.fixture(scope="module")
def s12():
    torch.manual_seed(0)
    return timm.create_model("schemeformer_ppaa_s12_224", num_classes=10).eval()


def test_registered_on_import():
    assert set(S12 + S24 + S36) <= set(timm.list_models("schemeformer*"))
    cfg = timm.models.get_pretrained_cfg("schemeformer_ppaa_s12_224")
    assert cfg.classifier == "head.fc" and cfg.first_conv == "stem.conv" and cfg.input_size == (3, 224, 224)
    assert not (cfg.url or cfg.hf_hub_id or cfg.file)


@pytest.mark.parametrize("name", S12 + S24 + S36)
def test_builds_and_runs(name):
    # the larger S24 and S36 variants are checked for structure only, on the meta device (no memory, no time)
    run = name in S12 or name in ("schemeformer_ppaa_s24_224", "schemeformer_ppaa_s36_224")
    model = timm.create_model(name, num_classes=7, device=None if run else "meta").eval()
    assert model.scheme_config == SchemeConfig(groups=GROUPS[name], expansion=8.0, cca=True)  # the paper's family
    mixers = [m for m in model.modules() if isinstance(m, SchemeMlp)]
    depths = DEPTHS[name.split("_")[2]]
    assert len(mixers) == sum(depths)
    assert all(m.groups == GROUPS[name] and m.has_cca for m in mixers)
    assert sorted({m.hidden_features for m in mixers}) == [8 * w for w in WIDTHS]
    if not run:
        return
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_trains_and_fuses_exactly(s12):
    model = timm.create_model("schemeformer_ppaa_s12_g8_224", num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    model(x).sum().backward()
    assert all(m.mix_logits.grad is not None for m in model.modules() if isinstance(m, SchemeMlp))
    model.eval()
    with torch.no_grad():
        before = model(x)
        fuse_for_inference(model)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert not any("mix_logits" in k or "cca" in k for k in model.state_dict())


def test_scheme_config_override():
    model = timm.create_model("schemeformer_ppaa_s12_224", num_classes=3,
                              scheme_config=dict(groups=8, cca_scale_mode="normalized"))
    assert model.scheme_config.groups == 8 and model.scheme_config.expansion == 8.0
    assert model.scheme_config.cca_scale_mode == "normalized"
    no_cca = timm.create_model("schemeformer_ppaa_s12_224", num_classes=3, scheme_config=SchemeConfig(cca=False))
    assert not any(m.has_cca for m in no_cca.modules() if isinstance(m, SchemeMlp))
    with pytest.raises(ValueError, match="unknown SCHEME option"):
        timm.create_model("schemeformer_ppaa_s12_224", scheme_config=dict(group=8))


def test_pretrained_fails_clearly():
    with pytest.raises(RuntimeError, match="no pretrained weights exist"):
        timm.create_model("schemeformer_ppaa_s12_224", pretrained=True)
    with pytest.raises(RuntimeError, match="pretrained_cfg_overlay"):
        timm.create_model("schemeformer_ppaa_s36_g2_224", pretrained=True, features_only=True)


def test_pretrained_from_own_file(tmp_path, s12):
    from safetensors.torch import save_file
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in s12.state_dict().items()}, str(path))
    model = timm.create_model("schemeformer_ppaa_s12_224", num_classes=10, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), s12(x))


def test_features_only():
    model = timm.create_model("schemeformer_ppaa_s12_224", features_only=True).eval()
    assert model.feature_info.channels() == list(WIDTHS)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.scheme_config.groups == 4
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 320, 4, 4), (2, 512, 2, 2)]
    picked = timm.create_model("schemeformer_ppaa_s12_224", features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        feats = picked(torch.randn(1, 3, 96, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 128, 12, 12), (1, 512, 3, 3)]
    fuse_for_inference(picked)  # a detection backbone deploys fused
    assert not any(m.has_cca for m in picked.modules() if isinstance(m, SchemeMlp))


def test_forward_intermediates(s12):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, inter = s12.forward_intermediates(x)
        only = s12.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(final, s12.forward_features(x))
    assert [tuple(t.shape[1:]) for t in inter] == [(64, 16, 16), (128, 8, 8), (320, 4, 4), (512, 2, 2)]
    assert [tuple(t.shape[1:]) for t in only] == [(320, 4, 4), (512, 2, 2)]


def test_patched_timm_models_stay_feature_backbones():
    x = torch.randn(1, 3, 64, 64)
    backbone = timm.create_model("poolformerv2_s12", features_only=True, out_indices=(0, 2)).eval()
    scheme_patch(backbone, groups=4, expansion=8)
    with torch.no_grad():
        feats = backbone(x)
        fuse_for_inference(backbone)
        fused = backbone(x)
    assert [tuple(f.shape) for f in feats] == [(1, 64, 16, 16), (1, 320, 4, 4)]
    for a, b in zip(feats, fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=4, num_classes=0).eval()
    scheme_patch(vit, groups=4, expansion=8)
    with torch.no_grad():
        inter = vit.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [tuple(t.shape) for t in inter] == [(1, 192, 8, 8)] * 2


def test_mac_counts_include_attention_as_explicit_attention_does():
    """FlopCounterMode has no formula for the CPU fused-attention kernel: the count must still include the
    attention matmuls, i.e. equal the count of the same model run with timm's explicit attention."""
    from timm_scheme.stats import count_macs

    torch.manual_seed(0)
    fused_attn = timm.create_model("schemeformer_ppaa_s12_224")
    timm.layers.set_fused_attn(False)
    try:
        explicit = timm.create_model("schemeformer_ppaa_s12_224")
    finally:
        timm.layers.set_fused_attn(True)
    assert fused_attn.stages[2].blocks[0].token_mixer.fused_attn and not explicit.stages[2].blocks[0].token_mixer.fused_attn
    counted = count_macs(fused_attn, (3, 224, 224))
    assert counted == count_macs(explicit, (3, 224, 224)) == 1_759_180_800
    # what torch's own counter misses is exactly the attention of the 14x14 and 7x7 stages: 2 N^2 C MACs per block
    # (Q K^T and A V), from the formula
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        fused_attn.eval()(torch.zeros(1, 3, 224, 224))
    attention = 6 * 2 * 196 ** 2 * 320 + 2 * 2 * 49 ** 2 * 512
    assert counted - plain.get_total_flops() // 2 == attention
