"""Every way timm users trace and export a model, against the eager model's own outputs.

The eager CPU kernels write into preallocated slices and loop over token tiles; a tracer that records them
would bake both in (wrong numbers at another batch size, lost ``out=`` writes). Traced, scripted and exported
forms must take plain ops instead. Each path is checked on DeiT, Swin, CAFormer (NCHW and channels-last
stages) and a SCHEMEformer, fused and unfused, and in training mode where the path supports training, at a
batch size other than the one it was traced with.
"""
from __future__ import annotations

import warnings

import onnxruntime
import pytest
import timm
import torch
from timm.utils.onnx import onnx_export
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor as tv_feature_extractor
from torchvision.models.feature_extraction import get_graph_node_names

import timm_scheme.kernels.mlp as bd_mlp
from timm_scheme import fuse_for_inference, scheme_patch
from timm_scheme.cli import main
from timm_scheme.io import ExportVerificationError, export_torchscript

from .models import ARCHITECTURES, create, shallow

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # what the tracer says of timm's own shape asserts, and the deprecation notices of jit and legacy ONNX
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The nodes obtained by tracing the model in train mode:UserWarning"),
]

TRACE_BATCH, RUN_BATCH = 2, 5
TOLERANCE = 1e-5  # max |traced - eager| / max |eager|, fp32
# blocks kept per stage: every block kind of the architecture, a fraction of the graph to trace
MODELS = {"deit_tiny_patch16_224": 2, "swin_tiny_patch4_window7_224": (2, 1, 1, 1), "caformer_s18": 1,
          "schemeformer_ppaa_s12_224": None}
FORMS = ("fused", "eval", "train")


def images(key: str, batch: int, seed: int = 0) -> torch.Tensor:
    size = ARCHITECTURES.get(key, (None, 64))[1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(key: str, form: str) -> nn.Module:
    """A small patched model with trained-looking mixing weights (alpha away from 0.5, so that folding it into
    fc2 and dropping CCA both change the numbers), without stochastic depth (train mode stays deterministic)."""
    torch.manual_seed(0)
    if key.startswith("schemeformer"):
        model = timm.create_model(key, num_classes=10, depths=(1, 1, 1, 1))
    else:
        model = scheme_patch(shallow(create(key, drop_path_rate=0.0), MODELS[key]), groups=4, expansion=8,
                             cca=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mix_logits"):
                param.copy_(torch.randn(2))
    if form == "fused":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the CCA weight an untrained model discards
            fuse_for_inference(model)
    return model.train(form == "train")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().float() - want.detach().float()).abs().max() / want.detach().abs().max())


@pytest.fixture(scope="module", params=[(k, f) for k in MODELS for f in FORMS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    key, form = request.param
    return key, form, build(key, form)


def eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# --- torch.jit.trace (also what the legacy ONNX exporter records) ---------------------------------------------

@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
def test_jit_trace_runs_at_another_batch_size(case, grad):
    key, form, model = case
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(model, images(key, TRACE_BATCH), check_trace=False)
    x = images(key, RUN_BATCH, seed=1)
    assert relative_error(traced(x), eager(model, x)) <= TOLERANCE


def gradient_error(got, want) -> float:
    """max |got - want| per parameter, relative to that gradient's own scale, but at least a thousandth of the
    largest gradient: mathematically zero gradients (a norm bias before PoolFormer's x - pool(x)) hold rounding
    noise (1e-13) in both, whose relative difference means nothing."""
    floor = 1e-3 * max(float(w.abs().max()) for w in want)
    return max(float((g - w).abs().max()) / max(float(w.abs().max()), floor) for g, w in zip(got, want))


def test_jit_trace_of_a_training_model_gives_eager_gradients():
    model = build("deit_tiny_patch16_224", "train")
    traced = torch.jit.trace(model, images("deit_tiny_patch16_224", TRACE_BATCH), check_trace=False)
    x = images("deit_tiny_patch16_224", RUN_BATCH, seed=1)
    params = [p for p in model.parameters()]
    want = torch.autograd.grad(model(x).square().mean(), params)
    got = torch.autograd.grad(traced(x).square().mean(), params)
    assert gradient_error(got, want) <= 1e-4


def test_jit_trace_is_not_specialised_to_token_tiles(monkeypatch):
    """Eager CPU inference loops over 64-token tiles here: traced at 2 images (one tile) and run at 24 (several
    tiles and a remainder), the recorded graph must not carry the tile loop."""
    monkeypatch.setattr(bd_mlp, "TILE_BYTES_PER_THREAD", 1)
    model = build("deit_tiny_patch16_224", "fused")
    with torch.no_grad():
        traced = torch.jit.trace(model, images("deit_tiny_patch16_224", TRACE_BATCH), check_trace=False)
    x = images("deit_tiny_patch16_224", 24, seed=1)
    assert relative_error(traced(x), eager(model, x)) <= TOLERANCE


# --- torch.jit.script ---------------------------------------------------------------------------------------

def test_jit_script_matches_eager(case):
    key, form, model = case
    scripted = torch.jit.script(model)
    x = images(key, RUN_BATCH, seed=1)
    assert relative_error(scripted(x), eager(model, x)) <= TOLERANCE
    if form == "train":  # a scripted training model still trains: every parameter gets its eager gradient
        params = list(model.parameters())
        want = torch.autograd.grad(model(x).square().mean(), params)
        got = torch.autograd.grad(scripted(x).square().mean(), params)
        assert gradient_error(got, want) <= 1e-4


def test_scripted_model_saves_and_loads(tmp_path):
    model = build("caformer_s18", "fused")
    path = tmp_path / "model.pt"
    torch.jit.script(model).save(str(path))
    x = images("caformer_s18", RUN_BATCH, seed=1)
    assert relative_error(torch.jit.load(str(path))(x), eager(model, x)) <= TOLERANCE


# --- ONNX: timm's exporter, legacy (TorchScript) and dynamo, run in onnxruntime --------------------------------

def onnx_outputs(path, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("form", ["fused", "eval"])
@pytest.mark.parametrize("key", list(MODELS))
def test_legacy_onnx_export_matches_eager_in_onnxruntime(key, form, tmp_path):
    """timm's onnx_export with use_dynamo=False: the TorchScript exporter that timm's onnx_export.py uses."""
    model = build(key, form)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        onnx_export(model, str(path), example_input=images(key, TRACE_BATCH), use_dynamo=False, check=True)
    x = images(key, RUN_BATCH, seed=1)
    assert relative_error(onnx_outputs(path, x), eager(model, x)) <= TOLERANCE


def test_legacy_onnx_export_with_autograd_on(tmp_path):
    """torch.onnx.export(dynamo=False) as users call it, outside no_grad."""
    model = build("deit_tiny_patch16_224", "fused").eval()
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (images("deit_tiny_patch16_224", TRACE_BATCH),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    x = images("deit_tiny_patch16_224", RUN_BATCH, seed=1)
    assert relative_error(onnx_outputs(path, x), eager(model, x)) <= TOLERANCE


@pytest.mark.parametrize("key", ["deit_tiny_patch16_224", "caformer_s18"])
def test_dynamo_onnx_export_of_an_unfused_eval_model(key, tmp_path):
    model = build(key, "eval")
    path = tmp_path / "model.onnx"
    onnx_export(model, str(path), example_input=images(key, TRACE_BATCH), use_dynamo=True, check=True)
    x = images(key, RUN_BATCH, seed=1)
    assert relative_error(onnx_outputs(path, x), eager(model, x)) <= TOLERANCE


# --- torch.export -------------------------------------------------------------------------------------------

def test_torch_export_matches_eager(case):
    key, form, model = case
    program = torch.export.export(model, (images(key, TRACE_BATCH),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    x = images(key, RUN_BATCH, seed=1)
    assert relative_error(program.module()(x), eager(model, x)) <= TOLERANCE


# --- torch.fx: torchvision's and timm's feature extraction ----------------------------------------------------

def test_torchvision_fx_feature_extractor_matches_eager(case):
    key, form, model = case
    train_nodes, eval_nodes = get_graph_node_names(model)
    last = (train_nodes if model.training else eval_nodes)[-1]
    extractor = tv_feature_extractor(model, return_nodes={last: "out"})
    extractor.train(model.training)
    x = images(key, RUN_BATCH, seed=1)
    assert relative_error(extractor(x)["out"], eager(model, x)) <= TOLERANCE


def test_timm_fx_feature_extraction_and_its_torchscript(case):
    """timm's FX feature extraction (FeatureGraphNet, with timm's leaf modules), then scripted as timm's own
    model tests do, against the outputs of the same modules in the eager model."""
    key, form, model = case
    names = dict(model.named_modules())
    taps = tuple(i for i, info in enumerate(model.feature_info) if info["module"] in names)
    extractor = timm.models.FeatureGraphNet(model, out_indices=taps).train(model.training)
    x = images(key, RUN_BATCH, seed=1)
    captured = []
    hooks = [names[model.feature_info[i]["module"]].register_forward_hook(lambda m, a, out: captured.append(out))
             for i in taps]
    try:
        eager(model, x)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        got = extractor(x)
        scripted = torch.jit.script(extractor)(x)
    assert len(got) == len(captured) == len(taps)
    for g, s, want in zip(got, scripted, captured):
        assert relative_error(g, want) <= TOLERANCE
        assert relative_error(s, want) <= TOLERANCE


# --- timm_scheme.export_torchscript and `timm-scheme export --torchscript` -------------------------------------

def test_export_torchscript_writes_a_checked_file(tmp_path):
    model = build("swin_tiny_patch4_window7_224", "fused")
    path = export_torchscript(model, tmp_path / "swin.pt")
    x = images("swin_tiny_patch4_window7_224", RUN_BATCH, seed=2)
    assert relative_error(torch.jit.load(str(path))(x), eager(model, x)) <= TOLERANCE
    assert model.training is False and [p.name for p in tmp_path.iterdir()] == ["swin.pt"]


def test_export_torchscript_refuses_unfused_models_and_keeps_files_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_bytes(b"an earlier export")
    with pytest.raises(ValueError, match="still hold their training-time CCA branch.*fuse_for_inference"):
        export_torchscript(build("deit_tiny_patch16_224", "eval"), path)
    monkeypatch.setattr("timm_scheme.io.torchscript.largest_difference", lambda *a: 0.5)
    with pytest.raises(ExportVerificationError, match="differs from PyTorch eager by 5.00e-01.*nothing was written"):
        export_torchscript(build("deit_tiny_patch16_224", "fused"), path)
    assert path.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    with pytest.raises(IsADirectoryError, match="is a folder"):
        export_torchscript(build("deit_tiny_patch16_224", "fused"), tmp_path)


def test_export_command_writes_torchscript(tmp_path, capsys):
    model = build("deit_tiny_patch16_224", "eval")
    torch.save(model.state_dict(), tmp_path / "checkpoint.pth")
    script = tmp_path / "deit.pt"
    args = ["export", "--checkpoint", str(tmp_path / "checkpoint.pth"), "--model", "deit_tiny_patch16_224",
            "--img-size", "32", "--num-classes", "10", "--model-kwargs", "patch_size=8", "depth=2",
            "drop_path_rate=0.0", "--groups", "4", "--expansion", "8"]
    assert main([*args, "--output", str(tmp_path / "out"), "--torchscript", str(script)]) == 0
    assert "torchscript" in capsys.readouterr().out
    x = images("deit_tiny_patch16_224", RUN_BATCH, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reference = fuse_for_inference(model.eval())
    assert relative_error(torch.jit.load(str(script))(x), eager(reference, x)) <= TOLERANCE
    # refused before any work: an existing file without --overwrite, and --torchscript with --no-fuse
    assert main([*args, "--output", str(tmp_path / "out2"), "--torchscript", str(script)]) == 2
    assert "--torchscript" in capsys.readouterr().out and not (tmp_path / "out2").exists()
    assert main([*args, "--output", str(tmp_path / "out3"), "--torchscript", str(tmp_path / "x.pt"), "--no-fuse"]) == 2
    assert "drop --no-fuse" in capsys.readouterr().out
