"""SCHEME checkpoints in transformers: AutoModelForImageClassification / TimmWrapper, AutoModel, the image
processor and pipeline("image-classification"), from a folder and from the Hub (served on 127.0.0.1).

References: the in-memory model that was saved (a save that changed the weights would pass a comparison of two
loads of the same folder), timm.create_model('local-dir:...') on the same folder, and timm's own preprocessing
(resolve_data_config + create_transform) for the pipeline.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import constants
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.models._hub import save_config_for_hf

transformers = pytest.importorskip("transformers")

import timm_scheme  # noqa: E402  (registers the entry point transformers' TimmWrapper calls)
from timm_scheme import fuse_for_inference, scheme_mixers, scheme_patch  # noqa: E402

from .hub_server import LocalHub, client_settings  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TOKEN, USER = "hf_test_5d1e07c2b9a4f36", "bob"
DATA_CONFIG = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, "interpolation": "bilinear"}


def make(fused: bool = True, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                              depth=2)
    scheme_patch(model, groups=4, expansion=8, **options)
    with torch.no_grad():
        for mixer in scheme_mixers(model).values():
            if mixer.has_cca:
                mixer.mix_logits.uniform_(-2, 2)
    model.eval()
    return fuse_for_inference(model) if fused else model


@pytest.fixture(scope="module")
def saved():
    """The in-memory model the folder holds."""
    return make()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, saved):
    path = tmp_path_factory.mktemp("ckpt") / "scheme-deit"
    timm_scheme.save_pretrained(saved, path, data_config=DATA_CONFIG)
    return path


def timm_reference(path) -> torch.nn.Module:
    return timm.create_model(f"local-dir:{path}", pretrained=True).eval()


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_config_keeps_timms_shape_without_a_second_class_count(folder):
    saved = json.loads((folder / "config.json").read_text())
    assert saved["num_classes"] == 10
    assert "num_classes" not in saved["model_args"]  # transformers passes it as its own keyword
    timm_path = folder.parent / "timm-config.json"
    save_config_for_hf(timm_reference(folder), str(timm_path))
    assert set(saved) == set(json.loads(timm_path.read_text()))  # the keys timm's own writer produces


@pytest.mark.parametrize("fused", [True, False])
def test_auto_model_for_image_classification_matches_timm(fused, tmp_path):
    path = tmp_path / "ckpt"
    model = make(fused=fused, cca=True)
    timm_scheme.save_pretrained(model, path)
    hf = transformers.AutoModelForImageClassification.from_pretrained(path).eval()
    assert isinstance(hf, transformers.TimmWrapperForImageClassification)
    x = images()
    with torch.no_grad():
        logits = hf(pixel_values=x).logits
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(logits, timm_reference(path)(x))
    assert hf.config.num_labels == 10


def test_auto_model_gives_timms_features(folder, saved):
    hf = transformers.AutoModel.from_pretrained(folder).eval()
    x = images()
    with torch.no_grad():
        features = hf(pixel_values=x).last_hidden_state
        torch.testing.assert_close(features, saved.forward_features(x))
        torch.testing.assert_close(features, timm_reference(folder).forward_features(x))


def test_image_processor_and_pipeline_use_the_checkpoints_preprocessing(folder, saved):
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    assert tuple(processor.data_config["mean"]) == DATA_CONFIG["mean"]
    assert tuple(processor.data_config["std"]) == DATA_CONFIG["std"]
    picture = Image.fromarray((np.random.RandomState(0).rand(40, 36, 3) * 255).astype("uint8"))
    model = timm_reference(folder)
    transform = create_transform(**resolve_data_config(model=model))
    with torch.no_grad():
        expected = saved(transform(picture)[None]).softmax(-1)[0]
        torch.testing.assert_close(model(transform(picture)[None]).softmax(-1)[0], expected)
    classify = transformers.pipeline("image-classification", model=str(folder), top_k=10)
    got = {int(r["label"].split("_")[-1]): r["score"] for r in classify(picture)}
    assert len(got) == 10
    torch.testing.assert_close(torch.tensor([got[i] for i in range(10)]), expected, rtol=1e-4, atol=1e-5)


def test_fine_tuning_with_a_new_class_count(folder, saved):
    """A new head on the saved backbone: the features are the saved model's, the logits the new head's on them."""
    hf = transformers.AutoModelForImageClassification.from_pretrained(folder, num_labels=3,
                                                                      ignore_mismatched_sizes=True).eval()
    timm_model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=3).eval()
    assert timm_model.num_classes == 3
    x = images()
    with torch.no_grad():
        features = saved.forward_features(x)
        logits = hf(pixel_values=x).logits
        assert logits.shape == (3, 3)
        torch.testing.assert_close(hf.timm_model.forward_features(x), features)
        torch.testing.assert_close(logits, hf.timm_model.forward_head(features))
        torch.testing.assert_close(timm_model.forward_features(x), features)


def test_from_the_hub(tmp_path, monkeypatch):
    with LocalHub(tokens={TOKEN: USER}, lifetime=300) as hub:
        for key, value in client_settings(hub, str(tmp_path / "hf-cache")).items():
            monkeypatch.setattr(constants, key, value)
        repo_id = f"{USER}/scheme-deit"
        model = make()
        timm_scheme.push_to_hub(model, repo_id, token=TOKEN, data_config=DATA_CONFIG)
        hf = transformers.AutoModelForImageClassification.from_pretrained(repo_id).eval()
        reference = timm.create_model(f"hf-hub:{repo_id}", pretrained=True).eval()
    x = images()
    with torch.no_grad():
        logits = hf(pixel_values=x).logits
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(logits, reference(x))
