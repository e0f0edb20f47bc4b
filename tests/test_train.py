"""The `train` command end to end on a tiny budget: logs, checkpoint, resume, annealing, fuse, verify, export."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from timm_scheme.cli import main

ROOT = Path(__file__).resolve().parents[1]
# a ViT small enough that an epoch on digits takes about a second
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2",
        "--img-size", "16", "--patch-size", "4", "--batch-size", "128", "--threads", "1", "--no-progress"]

pytestmark = pytest.mark.filterwarnings("ignore:fuse_for_inference:UserWarning")


def _train(tmp_path, name, *extra):
    out = tmp_path / name
    code = main(["train", *TINY, "--output", str(out), *extra])
    return code, out


def test_train_end_to_end(tmp_path):
    code, out = _train(tmp_path, "run", "--epochs", "2", "--cca")
    assert code == 0
    for name in ("log.csv", "log.json", "checkpoint.pth", "summary.json", "export/model.safetensors",
                 "export/config.json"):
        assert (out / name).is_file(), name
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    layers = [k for k in rows[0] if k.startswith("1-alpha:")]
    assert layers == ["1-alpha:blocks.0.mlp", "1-alpha:blocks.1.mlp"]
    assert all(0.0 < float(rows[0][k]) < 1.0 for k in layers)
    # the patch's default schedule fades CCA with the learning rate: the cosine ends below a tenth of its peak,
    # so by the last step CCA is gone and the run deploys the function it trained
    assert all(float(rows[-1][k]) == 0.0 for k in layers)

    log = json.loads((out / "log.json").read_text())
    assert set(log["epochs"][0]["cca_weights"]) == {"blocks.0.mlp", "blocks.1.mlp"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verified"] and summary["fused"] and summary["cca_tensors_left"] == []
    assert summary["fuse_max_relative_difference"] <= 1e-5
    assert summary["top1_fused"] == pytest.approx(summary["top1"])
    assert summary["macs_fused"] < summary["macs_with_cca"]
    assert summary["scheme_config"]["groups"] == 4 and summary["scheme_config"]["expansion"] == 8.0

    exported = load_file(str(out / "export" / "model.safetensors"))
    assert not any("mix_logits" in k or "cca" in k for k in exported)
    assert exported["blocks.0.mlp.fc1.weight"].shape == (4, 64, 8)  # (groups, 256 / 4, 32 / 4)
    # the export is a timm checkpoint folder: it loads back as the fused model, with the digits preprocessing
    model = timm.create_model(f"local-dir:{out / 'export'}", pretrained=True).eval()
    assert model.pretrained_cfg["input_size"] == (3, 16, 16) and tuple(model.pretrained_cfg["mean"]) == (0.5,) * 3
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 10) and not any("mix_logits" in k for k in model.state_dict())
    # the checkpoint records what `timm-scheme export` needs to rebuild the model on its own
    assert main(["export", "--checkpoint", str(out / "checkpoint.pth"), "--output", str(tmp_path / "exported")]) == 0


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    common = ("--epochs", "3", "--cca", "--cca-anneal-start", "0.3")
    code, straight = _train(tmp_path, "straight", *common)
    assert code == 0
    code, parted = _train(tmp_path, "parted", *common, "--stop-after", "1")
    assert code == 0 and not (parted / "summary.json").exists()
    assert len(json.loads((parted / "log.json").read_text())["epochs"]) == 1
    code, _ = _train(tmp_path, "parted", *common, "--resume", str(parted / "checkpoint.pth"))
    assert code == 0

    a = json.loads((straight / "log.json").read_text())["epochs"]
    b = json.loads((parted / "log.json").read_text())["epochs"]
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
        assert rb["cca_limit"] == pytest.approx(ra["cca_limit"])
    # the same final weights (mixing logits included) and optimizer state, not just the same logged losses
    final = [torch.load(d / "checkpoint.pth", map_location="cpu", weights_only=True) for d in (straight, parted)]
    assert any(k.endswith("mix_logits") for k in final[0]["model"])
    for key, tensor in final[0]["model"].items():
        torch.testing.assert_close(final[1]["model"][key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    moments = [[s["exp_avg"] for s in f["optimizer"]["state"].values()] for f in final]
    for a_moment, b_moment in zip(*moments):
        torch.testing.assert_close(b_moment, a_moment, rtol=1e-4, atol=1e-7)
    assert final[1]["scheduler"] == final[0]["scheduler"]
    # the annealing schedule ends at zero: fusing discards nothing of the trained function
    summary = json.loads((parted / "summary.json").read_text())
    assert b[-1]["cca_limit"] == 0.0 and summary["cca_weight_final"] == 0.0
    assert summary["fuse_relative_change_vs_training_function"] < 1e-5
    assert summary["top1_with_cca"] == pytest.approx(summary["top1_fused"])


def test_baselines_and_bd_only(tmp_path):
    code, dense = _train(tmp_path, "dense", "--epochs", "1", "--no-scheme", "--no-export")
    assert code == 0
    summary = json.loads((dense / "summary.json").read_text())
    assert summary["scheme_config"] is None and summary["cca_weights_final"] == {}
    code, bd = _train(tmp_path, "bd", "--epochs", "1", "--no-cca", "--groups", "2", "--no-export")
    assert code == 0
    summary = json.loads((bd / "summary.json").read_text())
    assert summary["scheme_config"]["cca"] is False and summary["scheme_config"]["groups"] == 2
    # g=2, E=8: the BD-MLP has the dense E=4 MLP's weights count (only fc1's bias is larger)
    assert summary["params"] == pytest.approx(json.loads((dense / "summary.json").read_text())["params"], rel=0.02)


def test_converting_a_trained_dense_checkpoint_keeps_its_accuracy(tmp_path):
    code, dense = _train(tmp_path, "dense", "--epochs", "12", "--batch-size", "32", "--no-scheme", "--no-export")
    assert code == 0
    dense_top1 = json.loads((dense / "log.json").read_text())["epochs"][-1]["top1"]
    # a learning rate too small to move anything: epoch 1's top-1 is the converted model's own
    frozen = ("--epochs", "1", "--lr", "1e-12", "--warmup-epochs", "0", "--no-export",
              "--initial-checkpoint", str(dense / "checkpoint.pth"))
    top1 = {}
    for name, options in (("random", ()), ("init_dense", ("--init", "dense"))):
        code, out = _train(tmp_path, name, *frozen, *options)
        assert code == 0
        top1[name] = json.loads((out / "log.json").read_text())["epochs"][-1]["top1"]
    assert dense_top1 > 60
    # random mixers start as small as the host's own layers, so the converted model is close to its attention path
    # alone and stays well above chance; init="dense" must recover most of what it loses (the margin depends on
    # the CPU: 15.8 points on an Intel AVX-512 VM, over 20 on an AMD EPYC one)
    assert top1["init_dense"] > dense_top1 - 10 and top1["init_dense"] > top1["random"] + 10, (dense_top1, top1)
    assert dense_top1 - top1["init_dense"] < (dense_top1 - top1["random"]) / 2, (dense_top1, top1)
    with pytest.raises(SystemExit, match="--initial-checkpoint .*no such file"):
        _train(tmp_path, "missing", *frozen[:-1], str(tmp_path / "nothing.pth"))
    whole = (dense / "checkpoint.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(SystemExit, match="--initial-checkpoint: .*truncated or corrupted"):
        _train(tmp_path, "truncated", *frozen[:-1], str(tmp_path / "truncated.pth"))
    with pytest.raises(SystemExit, match=r"does not fit VisionTransformer: missing \['blocks.2"):
        main(["train", *TINY, "--model-kwargs", "embed_dim=32", "depth=3", "num_heads=2", *frozen,
              "--output", str(tmp_path / "deeper")])


def test_already_scheme_model_is_not_patched_twice():
    import argparse
    from timm_scheme.cli import train as train_command
    from timm_scheme.cli.scheme_flags import scheme_flags_given
    from timm_scheme.training.run import build_model

    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    args = parser.parse_args(["--model", "schemeformer_ppaa_s12_g8_224", "--groups", "4"])
    args.scheme = scheme_flags_given(args)
    model = build_model(args, num_classes=10, input_size=(3, 64, 64))
    assert model.scheme_config.groups == 8  # the variant's own, not --groups 4


def test_image_folder(tmp_path):
    from PIL import Image
    for split in ("train", "validation"):
        for label in ("a", "b"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                color = (255 * (label == "a"), 40 * i, 0)
                Image.new("RGB", (20, 20), color).save(folder / f"{i}.png")
    code, out = _train(tmp_path, "folder", "--data-dir", str(tmp_path / "data"), "--epochs", "1",
                       "--batch-size", "4", "--img-size", "16", "--model-kwargs", "embed_dim=32", "depth=1",
                       "num_heads=2", "patch_size=4", "--no-export")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_classes"] == 2 and summary["input_size"] == [3, 16, 16] and summary["eval_images"] == 8


def test_example_script_help():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--cca-anneal-start" in result.stdout


@pytest.mark.slow
def test_reproduction_quick(tmp_path):
    pytest.importorskip("matplotlib")  # the script draws the plots
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "reproduce_digits.py"), "--quick", "--out", str(tmp_path / "res"),
         "--work-dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "res" / "digits_reproduction.json").read_text())
    configs = {r["config"] for r in data["runs"]}
    assert configs == {"dense_e4", "dense_e8", "bd_e8_g4", "scheme_e8_g4", "scheme_e8_g4_fused",
                       "scheme_e8_g4_anneal"}
    for run in data["runs"]:
        assert {"config", "seed", "top1", "params", "macs", "cca_weight_final"} <= set(run)
    assert "machine" in data
    for name in ("digits_reproduction.md", "digits_accuracy_vs_macs.png", "digits_cca_weight.png"):
        assert (tmp_path / "res" / name).is_file()


def test_train_logs_what_the_cca_branch_carries(tmp_path, caplog):
    caplog.set_level("INFO", logger="timm_scheme")
    code, out = _train(tmp_path, "forms", "--epochs", "2", "--cca", "--cca-form", "output_cross")
    assert code == 0
    epochs = json.loads((out / "log.json").read_text())["epochs"]
    # the branch mixes the block's own output, so it never carries more than its weight's share; across groups only
    assert 0.0 < epochs[0]["cca_share_mean"] <= 0.5
    assert epochs[0]["cca_cross_group_mass_mean"] == pytest.approx(1.0, abs=1e-6)
    assert epochs[-1]["cca_share_mean"] == 0.0  # annealed out with the learning rate
    lines = [r.getMessage() for r in caplog.records if "cross-group mass" in r.getMessage()]
    assert lines[0].startswith("at start: CCA over 2 mixers") and len(lines) == 3
