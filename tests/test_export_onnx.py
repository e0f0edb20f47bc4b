"""Export of SCHEME models: ``torch.export`` and ONNX (``timm_scheme.export_onnx``) with a dynamic batch.

Fused DeiT, Swin and CAFormer (a MetaFormer with conv and attention stages) are exported at batch 2 and run at
other batch sizes, in ``torch.export``'s module and in onnxruntime, against the eager PyTorch model.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import timm_scheme.kernels.mlp as bd_mlp
from timm_scheme import export_onnx, fuse_for_inference, scheme_patch
from timm_scheme.cli import main
from timm_scheme.io import OnnxVerificationError
from timm_scheme.layers import SchemeMlp

from .models import ARCHITECTURES, create, shallow

pytestmark = pytest.mark.usefixtures("one_thread")

# blocks kept per stage. Swin: its first stage's second block, the only shifted-window one at this image size
# (later stages fit in one window), whose attention mask reshapes by batch; CAFormer: its first block per stage
# already has both SCHEME layouts (NCHW conv stages, channels-last attention stages) and a parametrised
# activation (StarReLU)
EXPORTED = {"deit_tiny_patch16_224": 2, "swin_tiny_patch4_window7_224": (2, 1, 1, 1), "caformer_s18": 1}
EXPORT_BATCH = 2
RUN_BATCHES = (1, 5)  # neither is the export batch


def images(key: str, batch: int, seed: int = 0) -> torch.Tensor:
    size = ARCHITECTURES[key][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def patched(key: str, keep=None) -> nn.Module:
    torch.manual_seed(0)
    model = scheme_patch(shallow(create(key), keep=keep or EXPORTED[key]), groups=4, expansion=8, cca=True)
    with torch.no_grad():  # alpha away from its 0.5 init, so that folding it into fc2 changes the weights
        for name, param in model.named_parameters():
            if name.endswith("mix_logits"):
                param.copy_(torch.randn(2))
    return model


def fused(key: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the discarded CCA weight of an untrained model
        return fuse_for_inference(patched(key).eval())


def relative_error(got: np.ndarray, want: torch.Tensor) -> float:
    want = want.detach().numpy()
    return float(np.abs(got - want).max() / np.abs(want).max())


def batch_dynamic() -> tuple:
    return ({0: torch.export.Dim("batch", max=1024)},)


@pytest.fixture(scope="module", params=list(EXPORTED))
def fused_model(request):
    return request.param, fused(request.param)


# --- torch.export ----------------------------------------------------------------------------------------

def test_torch_export_of_fused_model_runs_at_any_batch(fused_model):
    key, model = fused_model
    program = torch.export.export(model, (images(key, EXPORT_BATCH),), dynamic_shapes=batch_dynamic())
    exported = program.module()
    with torch.no_grad():
        for batch in RUN_BATCHES:
            x = images(key, batch, seed=batch)
            torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", ["deit_tiny_patch16_224", "caformer_s18"])
def test_torch_export_of_training_mode_model_keeps_cca(key):
    model = patched(key).train()
    program = torch.export.export(model, (images(key, EXPORT_BATCH),), dynamic_shapes=batch_dynamic())
    x = images(key, 3, seed=3)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(program.module()(x), want, rtol=1e-5, atol=1e-5)
        # the training function is not the eval one: a graph without the CCA branch could not match
        assert (want - model.eval()(x)).abs().max() > 1e-3 * want.abs().max()


@pytest.mark.parametrize("use_conv", [False, True])
def test_traced_mixer_is_not_specialised_to_token_count(use_conv, monkeypatch):
    """Eagerly and without autograd, the fused mixer runs a tiled CPU kernel whose Python loop depends on the
    token count; traced, it must take the plain per-group path, or batch and tokens could not stay dynamic."""
    monkeypatch.setattr(bd_mlp, "TILE_BYTES_PER_THREAD", 1)  # 64-token tiles: 200 tokens span four of them
    torch.manual_seed(0)
    mixer = SchemeMlp(16, 64, groups=4, use_conv=use_conv, gated=True, act_layer=nn.SiLU).eval().fuse()
    batch, tokens = torch.export.Dim("batch", max=64), torch.export.Dim("tokens", max=4096)
    if use_conv:
        example, shapes = torch.randn(2, 16, 10, 20), ({0: batch, 3: tokens},)
        other = torch.randn(3, 16, 10, 7)
    else:
        example, shapes = torch.randn(2, 200, 16), ({0: batch, 1: tokens},)
        other = torch.randn(3, 70, 16)
    with torch.no_grad():  # eagerly, no autograd is what selects the tiled kernel
        exported = torch.export.export(mixer, (example,), dynamic_shapes=shapes).module()
        for x in (example, other):
            torch.testing.assert_close(exported(x), mixer(x), rtol=1e-5, atol=1e-5)


# --- ONNX ------------------------------------------------------------------------------------------------

def test_export_onnx_matches_pytorch_in_onnxruntime(fused_model, tmp_path):
    key, model = fused_model
    model.train()  # export_onnx exports the eval function and restores the mode
    size = ARCHITECTURES[key][1]
    # DeiT takes the default input size, read from the model (built with img_size=32, not the 224 of its name)
    input_size = None if key == "deit_tiny_patch16_224" else (3, size, size)
    path = export_onnx(model, tmp_path / "model.onnx", input_size=input_size, batch_size=EXPORT_BATCH)
    assert path == tmp_path / "model.onnx" and model.training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no staging file left behind

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {op.domain: op.version for op in proto.opset_import}[""] == 18
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch_dim, *image_dims = session.get_inputs()[0].shape
    assert isinstance(batch_dim, str) and image_dims == [3, size, size]
    model.eval()
    with torch.no_grad():
        for batch in RUN_BATCHES:
            x = images(key, batch, seed=10 + batch)
            (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
            assert got.shape[0] == batch
            assert relative_error(got, model(x)) < 1e-4


def test_export_onnx_of_a_bare_conv_mixer(tmp_path):
    """Any fused module exports, not only timm models: here an NCHW mixer with an opset other than the default."""
    torch.manual_seed(0)
    mixer = SchemeMlp(16, 64, groups=4, use_conv=True).eval().fuse()
    path = export_onnx(mixer, tmp_path / "mixer.onnx", input_size=(16, 5, 6), opset=17)
    proto = onnx.load(str(path))
    assert {op.domain: op.version for op in proto.opset_import}[""] == 17
    session = onnxruntime.InferenceSession(str(path))
    x = torch.randn(4, 16, 5, 6)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert relative_error(got, mixer(x)) < 1e-5


# --- bad input and failures ------------------------------------------------------------------------------

def test_export_onnx_refuses_an_unfused_model(tmp_path):
    model = patched("deit_tiny_patch16_224")
    with pytest.raises(ValueError, match=r"2 SCHEME mixer\(s\) still hold .*fuse_for_inference\(model\)"):
        export_onnx(model, tmp_path / "model.onnx")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("options,message", [
    (dict(opset=16), "opset=16 is too old; use opset >= 17"),
    (dict(batch_size=1), "batch_size=1; use 2 or more"),
    (dict(input_size=(32, 32)), r"input_size=\(32, 32\) must be \(channels, height, width\)"),
])
def test_export_onnx_bad_options(options, message, tmp_path):
    mixer = SchemeMlp(8, 16, groups=2).eval().fuse()
    with pytest.raises(ValueError, match=message):
        export_onnx(mixer, tmp_path / "mixer.onnx", **{"input_size": (8, 2, 2), **options})


def test_export_onnx_refuses_non_float32_weights_and_folders(tmp_path):
    mixer = SchemeMlp(8, 16, groups=2).eval().fuse()
    with pytest.raises(ValueError, match=r"torch.float16 tensors; call model.float\(\) first"):
        export_onnx(mixer.half(), tmp_path / "mixer.onnx", input_size=(8, 2, 2))
    with pytest.raises(IsADirectoryError, match="is a folder"):
        export_onnx(mixer.float(), tmp_path, input_size=(8, 2, 2))


class _TracesDifferently(nn.Module):
    """Computes another function when traced than when run eagerly: the hazard the verification exists for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 if torch.compiler.is_compiling() else x * 3.0


def existing_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"an earlier export")
    return path


def test_failed_verification_leaves_the_existing_file_untouched(tmp_path):
    path = existing_file(tmp_path)
    with pytest.raises(OnnxVerificationError, match=r"differs from PyTorch by 3.3\de-01 .* nothing was written"):
        export_onnx(nn.Sequential(nn.Conv2d(3, 4, 1), _TracesDifferently()), path, input_size=(3, 4, 4))
    assert path.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_exporter_crash_leaves_the_existing_file_untouched(tmp_path, monkeypatch):
    def crash_half_way(model, output_file, **kwargs):
        Path(output_file).write_bytes(b"half an ONNX file")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr("timm_scheme.io.onnx.onnx_export", crash_half_way)
    path = existing_file(tmp_path)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_onnx(SchemeMlp(8, 16, groups=2).eval().fuse(), path, input_size=(8, 2, 2))
    assert path.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_successful_export_replaces_the_existing_file(tmp_path):
    path = existing_file(tmp_path)
    mixer = SchemeMlp(8, 16, groups=2, use_conv=True).eval().fuse()
    export_onnx(mixer, path, input_size=(8, 3, 3))
    onnx.checker.check_model(onnx.load(str(path)))


# --- the command line ------------------------------------------------------------------------------------

def export_command(checkpoint: Path, out: Path, *extra) -> int:
    return main(["export", "--checkpoint", str(checkpoint), "--output", str(out), "--model", "deit_tiny_patch16_224",
                 "--img-size", "32", "--num-classes", "10", "--model-kwargs", "patch_size=8", "depth=1",
                 "--groups", "4", "--expansion", "8", *map(str, extra)])


def test_export_command_writes_a_verified_onnx_file(tmp_path, capsys):
    model = patched("deit_tiny_patch16_224", keep=1)
    torch.save(model.state_dict(), tmp_path / "checkpoint.pth")
    onnx_path = tmp_path / "deit.onnx"
    assert export_command(tmp_path / "checkpoint.pth", tmp_path / "out", "--onnx", onnx_path) == 0
    assert re.search(rf"^onnx +{re.escape(str(onnx_path))} \(", capsys.readouterr().out, re.MULTILINE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reference = fuse_for_inference(model.eval())
    session = onnxruntime.InferenceSession(str(onnx_path))
    x = images("deit_tiny_patch16_224", 3, seed=3)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert relative_error(got, reference(x)) < 1e-4

    # refused before any work: an existing file without --overwrite, and --onnx with --no-fuse
    assert export_command(tmp_path / "checkpoint.pth", tmp_path / "out2", "--onnx", onnx_path) == 2
    assert "--onnx" in capsys.readouterr().out and not (tmp_path / "out2").exists()
    assert export_command(tmp_path / "checkpoint.pth", tmp_path / "out3", "--onnx", tmp_path / "x.onnx",
                          "--no-fuse") == 2
    assert "drop --no-fuse" in capsys.readouterr().out and not (tmp_path / "out3").exists()
