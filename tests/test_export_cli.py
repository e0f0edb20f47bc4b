"""``timm-scheme export`` on checkpoints written the way timm's train script writes them.

The training checkpoint comes from a real (few-step) training run of a patched model, saved by timm's own
``CheckpointSaver`` with an EMA copy and the run's ``argparse.Namespace``. References are computed here from
that checkpoint with plain torch / timm, independently of the exporter.
"""
from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants
from timm.optim import create_optimizer_v2
from timm.utils import CheckpointSaver, ModelEmaV3

from timm_scheme import cca_weights
from timm_scheme import scheme_patch as _scheme_patch
from timm_scheme.cli import main
from timm_scheme.io.weights import read_training_checkpoint

from .hub_server import LocalHub, client_settings

pytestmark = [pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]

MODEL = "deit_tiny_patch16_224"
MODEL_KWARGS = {"patch_size": 8, "depth": 3}
TOKEN = "hf_export_test_77e1c0"


def scheme_patch(model, *args, **options):
    """These tests exercise SCHEME with its CCA branch (off by default): mixing weights, folding alpha, fusing."""
    return _scheme_patch(model, *args, **{"cca": True, **options})


def build(groups: int = 2, expansion: float = 4.0) -> torch.nn.Module:
    model = timm.create_model(MODEL, pretrained=False, num_classes=10, img_size=32, **MODEL_KWARGS)
    return scheme_patch(model, groups=groups, expansion=expansion)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A short training run, checkpointed by timm's CheckpointSaver as timm's train.py does."""
    out = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    args = argparse.Namespace(model=MODEL, num_classes=10, img_size=32, in_chans=3, model_kwargs=dict(MODEL_KWARGS),
                              groups=2, expansion=4.0, lr=5e-3, epochs=1)
    model = build()
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=generator), torch.randint(0, 10, (32,), generator=generator)
    model.train()
    for step in range(6):
        loss = F.cross_entropy(model(x[step % 4 * 8:][:8]), y[step % 4 * 8:][:8])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model, step=step)
    assert all(abs(w - 0.5) > 1e-4 for w in cca_weights(model).values())  # alpha moved: fusing folds something
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(out),
                            recovery_dir=str(out), decreasing=True)
    saver.save_checkpoint(epoch=0, metric=loss.item())
    assert (out / "model_best.pth.tar").is_file()
    return out


def reference(checkpoint: Path, key: str = "state_dict") -> torch.nn.Module:
    """The trained model, rebuilt from the checkpoint with plain torch and timm."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)[key]
    model = build()
    model.load_state_dict(state)
    return model.eval()


def inputs() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def export(*argv) -> int:
    return main(["export", *map(str, argv)])


def test_export_a_timm_training_checkpoint(run_dir, tmp_path, capsys):
    checkpoint = run_dir / "model_best.pth.tar"
    out = tmp_path / "scheme-deit"
    assert export("--checkpoint", checkpoint, "--output", out) == 0  # everything else from the checkpoint's args
    text = capsys.readouterr().out
    for step in range(1, 6):
        assert f"[{step}/5]" in text
    assert "model 'deit_tiny_patch16_224' from the checkpoint's args" in text
    assert "groups=2 from the checkpoint's args" in text
    assert "== export report ==" in text and "bit-identical" in text and "discarded by fusing" in text

    exported = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    trained = reference(checkpoint)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), trained(x), rtol=1e-5, atol=1e-6)  # fused == unfused eval
    assert not any(k.endswith(("mix_logits", "cca_limit")) for k in exported.state_dict())
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["scheme"]["fused"] is True
    assert config["model_args"]["scheme"]["config"]["groups"] == 2
    assert config["model_args"]["patch_size"] == 8 and config["num_classes"] == 10


def test_export_with_flags_from_a_bare_state_dict(run_dir, tmp_path, capsys):
    """The command line for a bare state dict (--model and the SCHEME flags name the architecture), on a checkpoint
    that records nothing but tensors."""
    trained = reference(run_dir / "model_best.pth.tar")
    bare = tmp_path / "weights.pth"
    torch.save(trained.state_dict(), bare)
    out = tmp_path / "out"
    assert export("--model", MODEL, "--groups", 2, "--expansion", 4, "--checkpoint", bare, "--output", out,
                  "--img-size", 32, "--model-kwargs", "patch_size=8", "depth=3") == 0
    assert "num_classes=10 from the classifier weights" in capsys.readouterr().out
    exported = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(inputs()), trained(inputs()), rtol=1e-5, atol=1e-6)


def test_export_ema_and_unfused(run_dir, tmp_path):
    checkpoint = run_dir / "model_best.pth.tar"
    assert export("--checkpoint", checkpoint, "--output", tmp_path / "ema", "--use-ema") == 0
    ema = reference(checkpoint, "state_dict_ema")
    exported = timm.create_model(f"local-dir:{tmp_path / 'ema'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(inputs()), ema(inputs()), rtol=1e-5, atol=1e-6)

    assert export("--checkpoint", checkpoint, "--output", tmp_path / "unfused", "--no-fuse") == 0
    unfused = timm.create_model(f"local-dir:{tmp_path / 'unfused'}", pretrained=True)
    trained = reference(checkpoint)
    for key, value in trained.state_dict().items():  # the training form, tensor for tensor
        assert torch.equal(unfused.state_dict()[key], value), key

    # an exported (fused) safetensors file exports again: already fused, nothing to fold
    assert export("--checkpoint", tmp_path / "ema" / "model.safetensors", "--output", tmp_path / "again",
                  "--model", MODEL, "--groups", 2, "--expansion", 4, "--img-size", 32,
                  "--model-kwargs", "patch_size=8", "depth=3") == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "ema" / "model.safetensors").read_bytes()


def test_export_and_push(run_dir, tmp_path, monkeypatch, capsys):
    with LocalHub(tokens={TOKEN: "bob"}, lifetime=120) as hub:
        for key, value in client_settings(hub, str(tmp_path / "cache")).items():
            monkeypatch.setattr(constants, key, value)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        assert export("--checkpoint", run_dir / "model_best.pth.tar", "--output", tmp_path / "out",
                      "--push-to-hub", "bob/scheme-deit", "--base-model", "timm/deit_tiny_patch16_224.fb_in1k") == 0
        text = capsys.readouterr().out
        assert "pushed" in text and "hf-hub:bob/scheme-deit" in text and TOKEN not in text
        assert len(hub.commits("bob/scheme-deit")) == 2
        for name in ("config.json", "model.safetensors", "README.md"):
            assert hub.files("bob/scheme-deit")[name] == (tmp_path / "out" / name).read_bytes()
        assert b'timm.create_model("hf-hub:bob/scheme-deit"' in hub.files("bob/scheme-deit")["README.md"]
        pulled = timm.create_model("hf-hub:bob/scheme-deit", pretrained=True).eval()
        local = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
        with torch.no_grad():
            assert torch.equal(pulled(inputs()), local(inputs()))


def test_export_of_a_dense_checkpoint_says_the_patch_line_is_missing(tmp_path, capsys):
    """A checkpoint of train.py run without the scheme_patch line: the error says so and how to convert it."""
    dense = timm.create_model(MODEL, pretrained=False, num_classes=10, img_size=32, **MODEL_KWARGS)
    args = argparse.Namespace(model=MODEL, num_classes=10, img_size=32, in_chans=3, model_kwargs=dict(MODEL_KWARGS))
    checkpoint = tmp_path / "dense.pth.tar"
    torch.save({"state_dict": dense.state_dict(), "args": args}, checkpoint)
    assert export("--checkpoint", checkpoint, "--output", tmp_path / "out") == 2
    text = capsys.readouterr().out
    width = dense.embed_dim * 4
    assert f"blocks.0.mlp.fc1.weight is a dense ({width}, {dense.embed_dim}) tensor in the weights" in text
    assert "weights of the unpatched model" in text and 'init="dense"' in text
    assert not (tmp_path / "out").exists()


def test_export_of_a_checkpoint_patched_with_a_filter(tmp_path, capsys):
    """train.py with ``scheme_patch(model, ..., filter_fn=...)``: the MLPs the filter left dense stay dense in the
    export, read off the weights, and the export computes what the trained model did."""
    torch.manual_seed(0)
    only_middle = lambda module, name: name == "blocks.1.mlp"  # noqa: E731
    trained = scheme_patch(timm.create_model(MODEL, pretrained=False, num_classes=10, img_size=32, **MODEL_KWARGS),
                           groups=2, expansion=4.0, filter_fn=only_middle).eval()
    for mixer in cca_weights(trained):  # a trained-looking CCA weight, so fusing folds something
        trained.get_submodule(mixer).mix_logits.data.copy_(torch.tensor([0.3, -0.2]))
    args = argparse.Namespace(model=MODEL, num_classes=10, img_size=32, in_chans=3, model_kwargs=dict(MODEL_KWARGS))
    checkpoint = tmp_path / "last.pth.tar"
    torch.save({"state_dict": trained.state_dict(), "args": args}, checkpoint)

    assert export("--checkpoint", checkpoint, "--output", tmp_path / "out") == 0
    assert "1 of 3 MLPs patched, as the weights show (dense: blocks.0.mlp, blocks.2.mlp)" in capsys.readouterr().out
    exported = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    assert type(exported.blocks[0].mlp) is type(exported.blocks[2].mlp) is timm.layers.Mlp
    assert type(exported.blocks[1].mlp) is not timm.layers.Mlp
    with torch.no_grad():
        torch.testing.assert_close(exported(inputs()), trained(inputs()), rtol=1e-5, atol=1e-6)


class _Payload:
    """Pickles into a call of open(): loading it unrestricted would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_export_errors(run_dir, tmp_path, capsys):
    checkpoint = run_dir / "model_best.pth.tar"

    assert export("--checkpoint", checkpoint, "--output", tmp_path / "a", "--groups", 4) == 2
    text = capsys.readouterr().out
    assert "blocks.0.mlp.fc1.weight: weights (2, 384, 96) vs model (4, 192, 48)" in text
    assert "groups=2 in the weights but groups=4 in the model" in text

    assert export("--checkpoint", tmp_path / "nope.pth", "--output", tmp_path / "a") == 2
    assert "nope.pth does not exist" in capsys.readouterr().out

    (tmp_path / "taken").mkdir()
    assert export("--checkpoint", checkpoint, "--output", tmp_path / "taken") == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().out
    assert export("--checkpoint", checkpoint, "--output", tmp_path / "taken", "--overwrite") == 0
    capsys.readouterr()

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": reference(checkpoint).state_dict(), "extra": _Payload(marker)}, evil)
    assert export("--checkpoint", evil, "--output", tmp_path / "b") == 2
    text = capsys.readouterr().out
    assert "refused to load it" in text and "weights_only=True" in text and "(io.open)" in text
    assert not marker.exists() and not (tmp_path / "b").exists()

    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(checkpoint.read_bytes()[:4096])
    assert export("--checkpoint", truncated, "--output", tmp_path / "c") == 2
    assert "truncated or corrupted" in capsys.readouterr().out

    bare = tmp_path / "bare.pth"
    torch.save(reference(checkpoint).state_dict(), bare)
    assert export("--checkpoint", bare, "--output", tmp_path / "d", "--use-ema", "--model", MODEL) == 2
    assert "no EMA weights" in capsys.readouterr().out

    assert export("--checkpoint", bare, "--output", tmp_path / "e") == 2
    assert "--model is required" in capsys.readouterr().out
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_threads_read_training_checkpoints_at_once(run_dir):
    """torch's allow-list for weights_only loads is process-wide: concurrent reads (a driver finishing two runs
    at once) must not take argparse.Namespace off it under each other."""
    checkpoint = run_dir / "model_best.pth.tar"
    expected = reference(checkpoint).state_dict()
    failures, start = [], threading.Barrier(4)

    def read_repeatedly():
        start.wait()
        for _ in range(6):
            try:
                state, info = read_training_checkpoint(checkpoint)
                assert info["args"]["model"] == MODEL and state.keys() == expected.keys()
            except Exception as e:  # noqa: BLE001  (collected and shown below)
                failures.append(repr(e)[:200])

    threads = [threading.Thread(target=read_repeatedly) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
