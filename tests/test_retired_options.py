"""Options that measured no gain were removed: a checkpoint that recorded them switched off still loads, one
trained with them on is refused with the reason, and the patch names them when asked for them."""
import json

import pytest
import timm
import torch

import timm_scheme
from timm_scheme.config import RETIRED_OPTIONS, SchemeConfig
from timm_scheme.io import CheckpointFormatError


def _saved(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=64,
                              num_heads=2, num_classes=5)
    timm_scheme.scheme_patch(model, groups=4, expansion=8)
    folder = tmp_path / "export"
    timm_scheme.save_pretrained(model.eval(), folder)
    return model, folder


def _record(folder, **values):
    """config.json as a version that still had the options wrote it."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["model_args"]["scheme"]["config"].update(values)
    path.write_text(json.dumps(config))


def test_a_checkpoint_that_recorded_them_off_still_loads(tmp_path):
    model, folder = _saved(tmp_path)
    _record(folder, block_lr_power=0.0, block_multiplier_power=0.0)
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("name", sorted(RETIRED_OPTIONS))
def test_a_checkpoint_trained_with_one_on_is_refused_with_the_reason(tmp_path, name):
    _, folder = _saved(tmp_path)
    _record(folder, **{name: 0.5})
    with pytest.raises(CheckpointFormatError, match=f"{name}=0.5: this option .* removed"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


def test_the_patch_names_a_removed_option():
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=64, num_heads=2)
    with pytest.raises(ValueError, match="block_lr_power=1.0: this option stretched"):
        timm_scheme.scheme_patch(model, groups=4, expansion=8, block_lr_power=1.0)
    assert SchemeConfig.from_dict({"groups": 2, "block_multiplier_power": 0}) == SchemeConfig(groups=2)
    assert "block_lr_power" not in SchemeConfig().to_dict()
