"""Checkpoints and the Hub: save_pretrained / push_to_hub, loaded back with stock ``timm.create_model``.

References are independent of the code under test: the outputs and state dict of the model that was saved,
timm's own ``forward_intermediates`` for ``features_only``, and bytes on disk. The Hub is the real
``huggingface_hub`` client talking to tests/hub_server.py on 127.0.0.1.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import struct
from pathlib import Path

import pytest
import timm
import torch
import yaml
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import safe_open
from timm.models._hub import save_for_hf

import timm_scheme
from timm_scheme import cca_in_eval, fuse_for_inference, scheme_patch
from timm_scheme import scheme_mixers
from timm_scheme.io import FORMAT_VERSION, CheckpointFormatError
from timm_scheme.io import save as save_module
from timm_scheme.stats import count_params

from .hub_server import LocalHub, client_settings

# the client's LFS upload passes a file object as data=, which httpx2 deprecates
pytestmark = [pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]

TOKEN = "hf_test_9f2c41d7e0b8a35"
USER = "alice"
MODELS = {
    "deit": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=3)),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=32, window_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))),
    "caformer": ("caformer_s18", dict()),  # timm fixes its depths and widths: the smallest CAFormer there is
}


# ------------------------------------------------------------------------------------------------ helpers

def make_model(kind: str, *, fused: bool = False, seed: int = 0, **patch_options) -> torch.nn.Module:
    name, kwargs = MODELS[kind]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    scheme_patch(model, groups=4, expansion=8, **{"cca": True, **patch_options})
    with torch.no_grad():  # learnt-looking mixing weights, so fusing has something to fold
        for mixer in scheme_mixers(model).values():
            if mixer.has_cca:
                mixer.mix_logits.uniform_(-3, 3)
    model.eval()
    if fused:
        with pytest.warns(UserWarning, match="discarded a CCA weight"):
            fuse_for_inference(model)
    return model


def inputs(seed: int = 1, size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def outputs(model: torch.nn.Module, x: torch.Tensor, training_function: bool = False) -> torch.Tensor:
    model.eval()
    if training_function:
        with cca_in_eval(model):
            return model(x)
    return model(x)


def assert_same_state(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    a, b = loaded.state_dict(), original.state_dict()
    assert list(a) == list(b)
    for key in b:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def assert_round_trip(loaded: torch.nn.Module, original: torch.nn.Module, x: torch.Tensor) -> None:
    assert_same_state(loaded, original)
    assert torch.equal(outputs(loaded, x), outputs(original, x))
    if any(m.has_cca for m in scheme_mixers(original).values()):  # the training function survives too
        assert torch.equal(outputs(loaded, x, True), outputs(original, x, True))
    assert loaded.scheme_config == original.scheme_config


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with LocalHub(tokens={TOKEN: USER}, lifetime=600) as server, pytest.MonkeyPatch.context() as mp:
        for key, value in client_settings(server, str(tmp_path_factory.mktemp("hf-cache"))).items():
            mp.setattr(constants, key, value)
        yield server


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch, hub):
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def deit_unfused():
    return make_model("deit")


@pytest.fixture(scope="module")
def deit_saved(deit_unfused, tmp_path_factory):
    return timm_scheme.save_pretrained(deit_unfused, tmp_path_factory.mktemp("saved") / "scheme-deit")


def copy_checkpoint(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    target.mkdir()
    for item in folder.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


def edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


# ------------------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("kind", ["deit", "swin"])
def test_round_trip_local_and_hub(kind, fused, tmp_path, hub, fresh_cache):
    model = make_model(kind, fused=fused)
    x = inputs()
    folder = timm_scheme.save_pretrained(model, tmp_path / f"scheme-{kind}")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert_round_trip(timm.create_model(f"local-dir:{folder}", pretrained=True), model, x)

    repo_id = f"{USER}/scheme-{kind}-{'fused' if fused else 'unfused'}"
    info = timm_scheme.push_to_hub(model, repo_id, token=TOKEN)
    commits = hub.commits(repo_id)
    assert len(commits) == 2 and commits[0].oid == info.oid  # repository creation, then our one commit
    files = hub.files(repo_id)
    assert sorted(files) == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()  # same model, same bytes
    assert_round_trip(timm.create_model(f"hf-hub:{repo_id}", pretrained=True), model, x)


@pytest.mark.slow
def test_round_trip_caformer(tmp_path, hub, fresh_cache):
    """The conv-MLP (NCHW, 1x1) family: unfused through a folder, fused through the Hub."""
    model = make_model("caformer")
    x = inputs()
    folder = timm_scheme.save_pretrained(model, tmp_path / "unfused", data_config={"input_size": (3, 32, 32)})
    assert_round_trip(timm.create_model(f"local-dir:{folder}", pretrained=True), model, x)

    with pytest.warns(UserWarning, match="discarded a CCA weight"):
        fuse_for_inference(model)
    timm_scheme.push_to_hub(model, f"{USER}/scheme-caformer", token=TOKEN, data_config={"input_size": (3, 32, 32)})
    assert_round_trip(timm.create_model(f"hf-hub:{USER}/scheme-caformer", pretrained=True), model, x)


@pytest.mark.skipif(not timm.is_model("schemeformer_ppaa_s12_224"), reason="SCHEMEformer not registered")
def test_round_trip_schemeformer(tmp_path):
    """A model registered with SCHEME mixers built in: rebuilt by its own entry point, not patched twice."""
    model = timm.create_model("schemeformer_ppaa_s12_224", pretrained=False, num_classes=10).eval()
    x = inputs(size=64, batch=1)
    folder = timm_scheme.save_pretrained(model, tmp_path / "unfused", data_config={"input_size": (3, 64, 64)})
    assert_round_trip(timm.create_model(f"local-dir:{folder}", pretrained=True), model, x)
    with pytest.warns(UserWarning):
        fuse_for_inference(model)
    folder = timm_scheme.save_pretrained(model, tmp_path / "fused", data_config={"input_size": (3, 64, 64)})
    assert_round_trip(timm.create_model(f"local-dir:{folder}", pretrained=True), model, x)


def test_fused_checkpoint_equals_unfused_eval(deit_unfused, tmp_path):
    """Fusing then saving reproduces the unfused model's eval outputs (to float rounding), bit-exactly after loading."""
    fused = copy.deepcopy(deit_unfused)
    with pytest.warns(UserWarning):
        fuse_for_inference(fused)
    folder = timm_scheme.save_pretrained(fused, tmp_path / "fused")
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    x = inputs()
    assert torch.equal(outputs(loaded, x), outputs(fused, x))
    torch.testing.assert_close(outputs(loaded, x), outputs(deit_unfused, x), rtol=1e-5, atol=1e-6)
    assert not any(k.endswith(("mix_logits", "cca_limit")) for k in loaded.state_dict())


def test_reload_and_save_again(deit_saved, tmp_path):
    """A loaded checkpoint saves again (its base architecture comes from the checkpoint) to the same bytes."""
    loaded = timm.create_model(f"local-dir:{deit_saved}", pretrained=True)
    again = timm_scheme.save_pretrained(loaded, tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (deit_saved / "model.safetensors").read_bytes()
    assert json.loads((again / "config.json").read_text())["model_args"] == \
        json.loads((deit_saved / "config.json").read_text())["model_args"]

    with pytest.warns(UserWarning):
        fuse_for_inference(loaded)
    fused = timm_scheme.save_pretrained(loaded, tmp_path / "fused")
    assert json.loads((fused / "config.json").read_text())["model_args"]["scheme"]["fused"] is True
    assert_round_trip(timm.create_model(f"local-dir:{fused}", pretrained=True), loaded, inputs())


def test_filtered_patch_records_its_modules(tmp_path):
    name, kwargs = MODELS["deit"]
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    scheme_patch(model, groups=4, expansion=8, filter_fn=lambda m, n: n == "blocks.1.mlp")
    folder = timm_scheme.save_pretrained(model, tmp_path / "partial")
    scheme = json.loads((folder / "config.json").read_text())["model_args"]["scheme"]
    assert scheme["modules"] == ["blocks.1.mlp"]
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert list(scheme_mixers(loaded)) == ["blocks.1.mlp"]
    assert_round_trip(loaded, model, inputs())


# --------------------------------------------------------------------------------- format and model card

def test_config_weights_and_card_format(deit_unfused, tmp_path):
    folder = timm_scheme.save_pretrained(deit_unfused, tmp_path / "card", base_model="timm/deit_tiny_patch16_224.fb_in1k",
                                         license="apache-2.0")
    config = json.loads((folder / "config.json").read_text())
    # the architecture name is timm's only word when timm_scheme is not imported: "Unknown model (<name>)"
    assert config["architecture"] == "scheme_patched__import_timm_scheme_first" and timm.is_model(config["architecture"])
    assert config["num_classes"] == 10
    assert config["model_args"]["scheme"] == {
        "format_version": FORMAT_VERSION, "base_architecture": "deit_tiny_patch16_224", "fused": False,
        "config": deit_unfused.scheme_config.to_dict()}
    assert config["model_args"]["img_size"] == [32, 32] and config["model_args"]["patch_size"] == 8
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["classifier"] == "head"
    assert config["pretrained_cfg"]["license"] == "apache-2.0"
    assert "tag" not in config["pretrained_cfg"]  # the base weights' tag says nothing about these

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        assert set(f.keys()) == set(deit_unfused.state_dict())
    assert metadata["format"] == "pt" and metadata["scheme_format_version"] == str(FORMAT_VERSION)
    assert len(metadata["weights_sha256"]) == 64

    text = (folder / "README.md").read_text()
    front, body = text.split("---\n")[1], text.split("---\n", 2)[2]
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert {"scheme", "image-classification", "timm"} <= set(meta["tags"])
    assert meta["base_model"] == "timm/deit_tiny_patch16_224.fb_in1k" and meta["license"] == "apache-2.0"
    assert f"| Parameters | {count_params(deit_unfused):,} |" in body
    assert "MACs per image" in body and "| `groups` | `4` |" in body
    assert "## Fuse report" in body and "Not fused" in body
    assert 'timm.create_model("local-dir:path/to/card", pretrained=True)' in body


def test_card_of_fused_model_has_the_fuse_report(tmp_path):
    model = make_model("deit", fused=True)
    text = (timm_scheme.save_pretrained(model, tmp_path / "f") / "README.md").read_text()
    report = model.scheme_fuse_report
    assert report.summary() in text
    for layer, weight in report.cca_weights.items():
        assert f"| `{layer}` | {weight:.4g} |" in text
    assert "base_model" not in text.split("---\n")[1]


def test_same_model_same_bytes(deit_unfused, deit_saved, tmp_path):
    again = timm_scheme.save_pretrained(deit_unfused, tmp_path / deit_saved.name)
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (again / name).read_bytes() == (deit_saved / name).read_bytes(), name


# ------------------------------------------------------------------------------- timm's loading behaviour

def test_new_head_keeps_the_trunk(deit_unfused, deit_saved):
    model = timm.create_model(f"local-dir:{deit_saved}", pretrained=True, num_classes=37)
    assert model.num_classes == 37 and model.head.weight.shape == (37, 192)
    original = deit_unfused.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, original[key]), key
    x = inputs()
    with torch.no_grad():
        assert torch.equal(model.eval().forward_features(x), deit_unfused.forward_features(x))


def test_pretrained_cfg_overlay_and_in_chans(deit_unfused, deit_saved):
    overlay = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0)
    model = timm.create_model(f"local-dir:{deit_saved}", pretrained=True, pretrained_cfg_overlay=overlay)
    data = timm.data.resolve_data_config(model=model)
    assert data["mean"] == overlay["mean"] and data["std"] == overlay["std"] and data["crop_pct"] == 1.0
    assert data["input_size"] == (3, 32, 32)
    assert model.pretrained_cfg["source"] == "local-dir"

    gray = timm.create_model(f"local-dir:{deit_saved}", pretrained=True, in_chans=1)
    stem = deit_unfused.patch_embed.proj.weight
    torch.testing.assert_close(gray.patch_embed.proj.weight, stem.sum(dim=1, keepdim=True))  # timm's adapt_input_conv


@pytest.mark.parametrize("kind", ["deit", "swin"])
def test_features_only(kind, tmp_path):
    model = make_model(kind, fused=kind == "swin")
    folder = timm_scheme.save_pretrained(model, tmp_path / kind)
    features = timm.create_model(f"local-dir:{folder}", pretrained=True, features_only=True).eval()
    x = inputs()
    with torch.no_grad():
        got = features(x)
        indices = features.feature_info.out_indices
        expected = model.forward_intermediates(x, indices=indices, intermediates_only=True)
    if kind == "swin":  # timm's swin features are NHWC, its intermediates NCHW
        expected = [e.permute(0, 2, 3, 1) for e in expected]
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert isinstance(features.scheme_config, timm_scheme.SchemeConfig)
    assert "classifier" not in features.pretrained_cfg


def test_from_pretrained_sources(deit_unfused, deit_saved, hub, fresh_cache, monkeypatch):
    x = inputs()
    monkeypatch.chdir(deit_saved.parent)
    for name in (deit_saved, str(deit_saved), f"local-dir:{deit_saved}", deit_saved.name):
        assert_round_trip(timm_scheme.from_pretrained(name), deit_unfused, x)
    timm_scheme.push_to_hub(deit_unfused, f"{USER}/from-pretrained", token=TOKEN)
    for name in (f"{USER}/from-pretrained", f"hf-hub:{USER}/from-pretrained"):
        assert_round_trip(timm_scheme.from_pretrained(name), deit_unfused, x)
    assert timm_scheme.from_pretrained(deit_saved, num_classes=5).num_classes == 5


def test_from_pretrained_refuses_a_plain_timm_checkpoint(tmp_path):
    plain = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                              depth=1)
    save_for_hf(plain, tmp_path / "plain", safe_serialization=True)
    with pytest.raises(CheckpointFormatError, match="'deit_tiny_patch16_224' that is not a SCHEME checkpoint"):
        timm_scheme.from_pretrained(tmp_path / "plain")


# -------------------------------------------------------------------------------------------- bad saves

def test_save_refuses_what_it_cannot_describe(tmp_path):
    plain = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    with pytest.raises(ValueError, match="not a SCHEME model"):
        timm_scheme.save_pretrained(plain, tmp_path / "a")

    model = make_model("deit")
    next(iter(scheme_mixers(model).values())).fuse()
    with pytest.raises(ValueError, match="partly fused"):
        timm_scheme.save_pretrained(model, tmp_path / "b")

    features = timm.create_model("deit_tiny_patch16_224", pretrained=False, features_only=True, img_size=32,
                                 patch_size=8, depth=3)
    scheme_patch(features)
    with pytest.raises(ValueError, match="features_only wrapper"):
        timm_scheme.save_pretrained(features, tmp_path / "c")
    assert not any(tmp_path.iterdir())


def test_existing_folder_is_refused_unless_overwrite(deit_unfused, tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        timm_scheme.save_pretrained(deit_unfused, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]

    timm_scheme.save_pretrained(deit_unfused, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or backup folder left

    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        timm_scheme.save_pretrained(deit_unfused, tmp_path / "file", overwrite=True)


@pytest.mark.parametrize("where", ["weights", "card", "swap"])
def test_interrupted_save_leaves_the_previous_checkpoint(deit_saved, tmp_path, monkeypatch, where):
    target = copy_checkpoint(deit_saved, tmp_path)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    other = make_model("deit", seed=5)

    if where == "weights":  # Ctrl-C halfway through the weights file
        real = save_module.write_safetensors

        def interrupted(state_dict, path, metadata):
            real(state_dict, path, metadata)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        monkeypatch.setattr(save_module, "write_safetensors", interrupted)
        error = KeyboardInterrupt
    elif where == "card":
        def broken(*args, **kwargs):
            raise RuntimeError("disk full")
        monkeypatch.setattr(save_module, "model_card", broken)
        error = RuntimeError
    else:  # the rename of the new folder into place fails: the old one is put back (the two-rename path, used
        # where the kernel cannot exchange two folders atomically)
        monkeypatch.setattr(save_module, "_rename_exchange", lambda a, b: False)
        real_replace = os.replace

        def failing(src, dst):
            if str(src).endswith(".partial"):
                raise OSError("rename failed")
            return real_replace(src, dst)
        monkeypatch.setattr(save_module.os, "replace", failing)
        error = OSError

    with pytest.raises(error):
        timm_scheme.save_pretrained(other, target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


# -------------------------------------------------------------------------------------------- bad loads

def test_truncated_weights(deit_saved, tmp_path):
    folder = copy_checkpoint(deit_saved, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupted") as e:
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert str(weights) in str(e.value)


def test_corrupted_weights(deit_saved, tmp_path):
    folder = copy_checkpoint(deit_saved, tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte inside a tensor: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="checksum.*corrupted"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)

    (header_length,) = struct.unpack("<Q", bytes(data[:8]))
    data[8:8 + header_length] = b"\0" * header_length  # a destroyed header
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="not a readable safetensors file"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


def test_config_that_does_not_match_the_weights(deit_saved, tmp_path):
    folder = copy_checkpoint(deit_saved, tmp_path)
    edit_config(folder, lambda c: c["model_args"]["scheme"]["config"].update(groups=2))
    with pytest.raises(CheckpointFormatError) as e:
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    message = str(e.value)
    assert "blocks.0.mlp.fc1.weight: weights (4, 384, 48) vs model (2, 768, 96)" in message
    assert "groups=4 in the weights but groups=2 in the model" in message

    edit_config(folder, lambda c: c["model_args"]["scheme"]["config"].update(groups=4))
    edit_config(folder, lambda c: c["model_args"]["scheme"].update(fused=True))
    with pytest.raises(CheckpointFormatError, match=r"unexpected in the weights \(15\): .*blocks.0.mlp.cca_fade, blocks.0.mlp.cca_step") as e:
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert "the config says fused=true" in str(e.value)

    edit_config(folder, lambda c: c["model_args"].update(depth=4))
    with pytest.raises(CheckpointFormatError, match=r"missing from the weights \(\d+\): blocks.3.norm1.weight"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


def test_fused_weights_under_an_unfused_config(tmp_path):
    folder = timm_scheme.save_pretrained(make_model("deit", fused=True), tmp_path / "f")
    edit_config(folder, lambda c: c["model_args"]["scheme"].update(fused=False))
    with pytest.raises(CheckpointFormatError, match="missing from the weights.*mix_logits") as e:
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert "the config says fused=false" in str(e.value)


def test_unknown_or_broken_format(deit_saved, tmp_path):
    folder = copy_checkpoint(deit_saved, tmp_path)
    edit_config(folder, lambda c: c["model_args"]["scheme"].update(format_version=FORMAT_VERSION + 98))
    with pytest.raises(CheckpointFormatError, match=f"format_version {FORMAT_VERSION + 98} is newer.*pip install -U"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)

    edit_config(folder, lambda c: c["model_args"]["scheme"].update(format_version=1, base_architecture="no_such_vit"))
    with pytest.raises(CheckpointFormatError, match="base_architecture='no_such_vit' is not a model registered"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)

    edit_config(folder, lambda c: c["model_args"]["scheme"].update(base_architecture="deit_tiny_patch16_224",
                                                                  config={"groups": 4, "warp": 9}))
    with pytest.raises(CheckpointFormatError, match=r"unknown SCHEME option\(s\) \['warp'\]"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)

    edit_config(folder, lambda c: c["model_args"].pop("scheme"))
    with pytest.raises(TypeError, match="needs their model_args\\['scheme'\\]"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


def test_missing_files(deit_saved, tmp_path):
    folder = copy_checkpoint(deit_saved, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no model.safetensors \(it holds \['README.md', 'config.json'\]\)"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert timm.create_model(f"local-dir:{folder}", pretrained=False).num_classes == 10  # the config alone builds

    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    with pytest.raises(FileNotFoundError, match=r"has no config.json \(it holds \['README.md'\]\)"):
        timm_scheme.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="the folder does not exist"):
        timm_scheme.from_pretrained(f"local-dir:{tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="is not an existing folder"):
        timm_scheme.from_pretrained(tmp_path / "nowhere")


def test_hub_repository_without_weights(deit_saved, hub, fresh_cache):
    api = HfApi(token=TOKEN)
    repo_id = api.create_repo(f"{USER}/config-only").repo_id
    api.upload_folder(repo_id=repo_id, folder_path=deit_saved, allow_patterns=["config.json", "README.md"])
    with pytest.raises(FileNotFoundError, match=f"hf-hub:{repo_id} has no model.safetensors"):
        timm.create_model(f"hf-hub:{repo_id}", pretrained=True)
    with pytest.raises(FileNotFoundError, match="no such repository"):
        timm_scheme.from_pretrained(f"hf-hub:{USER}/never-pushed")
    with pytest.raises(FileNotFoundError, match="revision 'v9' does not exist"):
        timm_scheme.from_pretrained(f"hf-hub:{repo_id}@v9")


def test_offline_hub(deit_unfused, hub, fresh_cache, monkeypatch):
    repo_id = f"{USER}/offline"
    timm_scheme.push_to_hub(deit_unfused, repo_id, token=TOKEN)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1, nothing cached
    with pytest.raises(LocalEntryNotFoundError, match="offline mode is on .HF_HUB_OFFLINE=1.*local-dir"):
        timm_scheme.from_pretrained(f"hf-hub:{repo_id}")
    with pytest.raises(LocalEntryNotFoundError) as e:  # stock timm: the client's own error, cause included
        timm.create_model(f"hf-hub:{repo_id}", pretrained=True)
    assert "offline mode is enabled" in str(e.value.__cause__)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hf_hub_download(repo_id, "config.json")  # only the config reaches the cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LocalEntryNotFoundError, match="model.safetensors is not in the local Hub cache"):
        timm.create_model(f"hf-hub:{repo_id}", pretrained=True)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    timm.create_model(f"hf-hub:{repo_id}", pretrained=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # cached: loads offline
    before = len(hub.requests)
    assert_round_trip(timm.create_model(f"hf-hub:{repo_id}", pretrained=True), deit_unfused, inputs())
    assert len(hub.requests) == before


def test_nothing_is_unpickled(deit_unfused, tmp_path, hub, fresh_cache, monkeypatch):
    calls = []
    real_load = torch.load

    def guarded_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        assert kwargs.get("weights_only") is True, "torch.load without weights_only=True"
        return real_load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", guarded_load)
    folder = timm_scheme.save_pretrained(deit_unfused, tmp_path / "p")
    timm.create_model(f"local-dir:{folder}", pretrained=True)
    timm_scheme.push_to_hub(deit_unfused, f"{USER}/no-pickle", token=TOKEN)
    timm.create_model(f"hf-hub:{USER}/no-pickle", pretrained=True)
    assert calls == []  # safetensors all the way


# ------------------------------------------------------------------------------------------------ pushing

def test_push_sends_the_token_and_never_logs_it(deit_unfused, hub, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    start = len(hub.requests)
    timm_scheme.push_to_hub(deit_unfused, f"{USER}/token-check", token=TOKEN, private=True)
    writes = [(m, p, ok) for m, p, ok in hub.requests[start:] if m in ("POST",) and "/_lfs/" not in p]
    assert writes and all(ok for _, p, ok in writes if p != "/api/validate-yaml")
    out, err = capfd.readouterr()
    assert TOKEN not in caplog.text and TOKEN not in out and TOKEN not in err

    with pytest.raises(HfHubHTTPError, match="401"):  # private: not readable without the token
        hf_hub_download(f"{USER}/token-check", "config.json", token=False)
    with pytest.raises(HfHubHTTPError, match="401|Invalid credentials"):
        timm_scheme.push_to_hub(deit_unfused, f"{USER}/no-token", token="hf_wrong")
    assert f"{USER}/no-token" not in hub.repos


def test_push_again_keeps_the_card_and_can_open_a_pr(deit_unfused, hub, fresh_cache):
    repo_id = f"{USER}/twice"
    timm_scheme.push_to_hub(deit_unfused, repo_id, token=TOKEN)
    card = hub.files(repo_id)["README.md"]

    other = make_model("deit", seed=3, fused=True)
    info = timm_scheme.push_to_hub(other, repo_id, token=TOKEN, create_pr=True, commit_message="fused weights")
    assert info.pr_url and len(hub.commits(repo_id)) == 2  # main untouched
    assert hub.files(repo_id)["README.md"] == card
    assert hub.commits(repo_id, "refs/pr/1")[0].message == "fused weights"
    assert hub.files(repo_id, "refs/pr/1")["README.md"] == card  # kept, as timm's push_to_hf_hub does
    assert_round_trip(timm.create_model(f"hf-hub:{repo_id}@refs/pr/1", pretrained=True), other, inputs())
    assert_round_trip(timm.create_model(f"hf-hub:{repo_id}", pretrained=True), deit_unfused, inputs())

    timm_scheme.push_to_hub(other, repo_id, token=TOKEN, replace_model_card=True)
    assert hub.files(repo_id)["README.md"] != card and b"Fuse report" in hub.files(repo_id)["README.md"]
    assert len(hub.commits(repo_id)) == 3
