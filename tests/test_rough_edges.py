"""What a new user runs into: bad expansions, a config.json that does not fit, loading without the import, a
model without CCA, the preprocessing a training run used, and a save killed half way."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_scheme
from timm_scheme import fuse_for_inference, scheme_patch
from timm_scheme.cli import main
from timm_scheme.io import CheckpointFormatError
from timm_scheme.io import save as save_module

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10, **kwargs)


@pytest.mark.parametrize("expansion", [0.001, float("inf"), float("nan")])
def test_expansions_without_a_hidden_width_are_refused_clearly(expansion):
    model = tiny_vit()
    with pytest.raises(ValueError, match="expansion|hidden width") as error:
        scheme_patch(model, expansion=expansion)
    assert "ZeroDivision" not in repr(error.value) and "Overflow" not in repr(error.value)
    assert not timm_scheme.is_patched(model)


def test_a_hidden_width_that_rounds_to_zero_names_the_layer():
    with pytest.raises(ValueError, match=r"hidden width 0 of layer 'blocks.0.mlp'.*positive multiple of groups=4"):
        scheme_patch(tiny_vit(), expansion=0.002)


def test_a_config_json_whose_groups_do_not_fit_names_the_file(tmp_path):
    folder = timm_scheme.save_pretrained(scheme_patch(tiny_vit()), tmp_path / "ck")
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["scheme"]["config"]["groups"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match=rf"local-dir:{folder}.*config.json records SCHEME options "
                                                    r"\(groups=5, .*groups=5 does not divide"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


def test_loading_without_the_import_says_what_to_do_and_old_checkpoints_still_load(tmp_path):
    model = scheme_patch(tiny_vit()).eval()
    folder = timm_scheme.save_pretrained(model, tmp_path / "ck")
    code = f"import timm; timm.create_model('local-dir:{folder}', pretrained=True)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Unknown model (scheme_patched__import_timm_scheme_first)" in result.stderr
    # a format-1 checkpoint: the architecture name of then, no schedule options nor buffers
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = config["pretrained_cfg"]["architecture"] = "scheme_patched"
    config["model_args"]["scheme"]["format_version"] = 1
    for key in ("cca_anneal", "cca_anneal_steps", "cca_anneal_start", "cca_lr_floor"):
        config["model_args"]["scheme"]["config"].pop(key)
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file
    weights = {k: v for k, v in load_file(folder / "model.safetensors").items()
               if not k.endswith(("cca_step", "cca_fade", "cca_lr_peak"))}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt", "scheme_format_version": "1"})
    old = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(old(x), model(x), rtol=0, atol=0)


def test_a_model_without_cca_says_there_was_nothing_to_fuse(tmp_path):
    model = scheme_patch(tiny_vit(), cca=False)
    fuse_for_inference(model)
    assert "nothing to fuse" in model.scheme_fuse_report.summary()
    assert "without CCA (cca=False)" in model.scheme_fuse_report.summary()
    card = (timm_scheme.save_pretrained(model, tmp_path / "ck") / "README.md").read_text()
    assert "without CCA (cca=False)" in card and "nothing to fuse" in card


def test_export_carries_the_preprocessing_of_the_training_run(tmp_path):
    """`timm-scheme train` on digits normalises with mean = std = 0.5 at 16 px, not ImageNet's at 224: the
    exported pretrained_cfg, which timm's resolve_data_config and validate.py read, must say so."""
    out = tmp_path / "run"
    assert main(["train", "--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=1",
                 "num_heads=2", "--img-size", "16", "--patch-size", "4", "--epochs", "1", "--threads", "1",
                 "--no-progress", "--no-export", "--output", str(out)]) == 0
    assert main(["export", "--checkpoint", str(out / "checkpoint.pth"), "--output", str(tmp_path / "export")]) == 0
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)
    data = timm.data.resolve_data_config(model=loaded)
    assert tuple(data["mean"]) == (0.5, 0.5, 0.5) and tuple(data["std"]) == (0.5, 0.5, 0.5)
    assert tuple(data["input_size"]) == (3, 16, 16)


# --- saving: a killed save, and the folder swap ----------------------------------------------------------------

_KILLED_SAVE = """
import sys, time, timm, timm_scheme
from timm_scheme.io import save
model = timm_scheme.scheme_patch(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1))
def stall(*args, **kwargs):
    print("writing", flush=True)
    time.sleep(600)
save.write_safetensors = stall
timm_scheme.save_pretrained(model, sys.argv[1], overwrite=True)
"""


def test_a_save_killed_half_way_leaves_the_old_checkpoint_and_its_debris_is_cleaned(tmp_path):
    model = scheme_patch(tiny_vit())
    target = timm_scheme.save_pretrained(model, tmp_path / "ck")
    before = (target / "model.safetensors").read_bytes()
    process = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(target)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    debris = [p.name for p in tmp_path.iterdir() if p.name != "ck"]
    assert len(debris) == 1 and debris[0].startswith(f".ck.{process.pid}.") and debris[0].endswith(".partial")
    assert (target / "model.safetensors").read_bytes() == before  # the good checkpoint is untouched
    timm_scheme.save_pretrained(model, target, overwrite=True)    # the next save of that target cleans up
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_overwriting_swaps_folders_by_either_path(tmp_path, monkeypatch, exchange):
    calls = []
    real = save_module._rename_exchange

    def spy(a, b):
        calls.append(real(a, b) if exchange else False)
        return calls[-1]

    monkeypatch.setattr(save_module, "_rename_exchange", spy)
    first, second = scheme_patch(tiny_vit()), scheme_patch(tiny_vit())
    with torch.no_grad():
        next(second.parameters()).add_(1.0)
    target = timm_scheme.save_pretrained(first, tmp_path / "ck")
    timm_scheme.save_pretrained(second, target, overwrite=True)
    # the overwrite alone swaps (the first save has nothing to swap with); on Linux the kernel does it in one step
    assert calls == [exchange and sys.platform.startswith("linux")]
    loaded = timm.create_model(f"local-dir:{target}", pretrained=True)
    torch.testing.assert_close(next(loaded.parameters()), next(second.parameters()))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
