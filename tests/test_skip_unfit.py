"""skip_unfit=True: layers whose widths the group count does not fit stay dense, the rest are patched; the
choice is recomputed here from timm's own modules, and the partly patched model trains, fuses and round-trips."""
import logging

import pytest
import timm
import torch
from timm.layers import Mlp

from timm_scheme import SchemeMlp, find_mlps, fuse_for_inference, save_pretrained, scheme_patch

GROUPS = 4


def csatv2():
    torch.manual_seed(0)
    return timm.create_model("csatv2", pretrained=False, num_classes=10).eval()


def unfit_by_width(model):
    """The MLPs a group count of GROUPS cannot split, read from the dense modules themselves."""
    return {name for name, m in find_mlps(model)
            if m.fc1.in_features % GROUPS or m.fc2.out_features % GROUPS}


def test_refused_by_default_with_the_option_named_and_the_model_left_as_it_was():
    model = csatv2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"groups=4 does not divide .*skip_unfit=True"):
        scheme_patch(model, groups=GROUPS, expansion=8)
    assert not any(isinstance(m, SchemeMlp) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_patches_what_fits_and_reports_the_rest(caplog):
    model = csatv2()
    expected_skipped = unfit_by_width(model)
    originals = dict(find_mlps(model))
    assert expected_skipped and len(expected_skipped) < len(originals)  # the case this test is about
    with caplog.at_level(logging.WARNING, logger="timm_scheme.patching.patch"):
        scheme_patch(model, groups=GROUPS, expansion=8, skip_unfit=True)
    assert set(model.scheme_skipped) == expected_skipped
    for name, module in originals.items():
        now = model.get_submodule(name)
        if name in expected_skipped:
            assert now is module and isinstance(now, Mlp)
            assert "386" in model.scheme_skipped[name] and "groups=4" in model.scheme_skipped[name]
        else:
            assert isinstance(now, SchemeMlp) and now.fc1.groups == GROUPS
    assert all(name in caplog.text for name in expected_skipped)


def test_partly_patched_model_trains_fuses_exactly_and_round_trips(tmp_path):
    model = scheme_patch(csatv2(), groups=GROUPS, expansion=8, skip_unfit=True, cca=True)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    model(x).logsumexp(-1).sum().backward()  # gradients reach the dense and the patched layers alike
    skipped = next(iter(model.scheme_skipped))
    assert model.get_submodule(skipped).fc1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        want = model(x)
    with pytest.warns(UserWarning, match="discarded a CCA weight"):  # never annealed here: exact all the same
        fuse_for_inference(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    save_pretrained(model, tmp_path / "export")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    assert isinstance(loaded.get_submodule(skipped), Mlp)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-6)


def test_a_group_count_that_fits_no_layer_is_refused_even_with_skip():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    with pytest.raises(ValueError, match=r"groups=7 fits none of the 2 MLPs"):
        scheme_patch(model, groups=7, expansion=7, skip_unfit=True)
    assert not any(isinstance(m, SchemeMlp) for m in model.modules())
