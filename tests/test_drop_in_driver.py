"""The drop-in evidence driver (examples/drop_in): the one line reaches the script's model, and the results table
reports what the runs measured."""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DROP_IN = ROOT / "examples" / "drop_in"

# a stand-in for timm's train.py: imports create_model the way train.py does and reports the model's MLPs
SCRIPT = """
import json, sys
from timm.models import create_model
model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3)
mixers = [type(b.mlp).__name__ for b in model.blocks]
groups = [getattr(b.mlp, "groups", None) for b in model.blocks]
json.dump(dict(mixers=mixers, groups=groups, argv=sys.argv[1:]), open(sys.argv[1], "w"))
"""


def driver():
    spec = importlib.util.spec_from_file_location("run_timm_train", DROP_IN / "run_timm_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(tmp_path, *scheme):
    script, report = tmp_path / "train.py", tmp_path / "report.json"
    script.write_text(SCRIPT)
    subprocess.run([sys.executable, str(DROP_IN / "with_patch.py"), *scheme, str(script), str(report), "--x", "1"],
                   check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return json.loads(report.read_text())


def test_with_patch_applies_the_line_to_the_scripts_model(tmp_path):
    patched = run_script(tmp_path, "--scheme", json.dumps({"groups": 4, "expansion": 8}))
    assert patched["mixers"] == ["SchemeMlp", "SchemeMlp"] and patched["groups"] == [4, 4]
    assert patched["argv"] == [str(tmp_path / "report.json"), "--x", "1"]  # the script's own arguments, untouched
    dense = run_script(tmp_path)
    assert dense["mixers"] == ["Mlp", "Mlp"]
    second = run_script(tmp_path, "--scheme", json.dumps({"groups": 4, "expansion": 8}), "--only", "blocks.1.")
    assert second["mixers"] == ["Mlp", "SchemeMlp"]  # the filter_fn of --only: one block patched


def record(family, variant, seed, top1):
    return dict(family=family, variant=variant, seed=seed, options=None, train_py_top1=top1, epochs=30)


def test_results_table_reports_the_gap_to_dense_over_shared_seeds(tmp_path):
    run_timm_train = driver()
    records = [record("swin", "dense", 1, 94.0), record("swin", "dense", 2, 92.0), record("swin", "dense", 3, 96.0),
               record("swin", "scheme", 1, 93.0), record("swin", "scheme", 2, 94.5), record("swin", "scheme", 4, 90.0),
               record("vit", "dense", 1, 97.0), record("vit", "scheme", 1, 98.0)]
    run_timm_train.summarise(records, tmp_path, "test machine")
    table = (tmp_path / "results.md").read_text().splitlines()
    assert "after 30 epochs" in table[0] and "test machine" in table[0]
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line for line in table[4:]}
    gaps = [93.0 - 94.0, 94.5 - 92.0]  # seed 4 has no dense run: left out of the gap, kept in the mean
    expected = f"{statistics.mean(gaps):+.1f} ± {statistics.stdev(gaps) / 2 ** 0.5:.1f} (2 seeds)"
    minus_dense = {k: line.rstrip(" |").split(" | ")[-2] for k, line in rows.items()}
    assert minus_dense[("swin", "scheme")] == expected
    assert f"{statistics.mean([93.0, 94.5, 90.0]):.1f} (93.0 / 94.5 / 90.0)" in rows[("swin", "scheme")]
    assert minus_dense[("vit", "scheme")] == "+1.0 (1 seed)"
    assert minus_dense[("swin", "dense")] == "-"
    assert json.loads((tmp_path / "results.json").read_text()) == records


def test_results_table_reports_a_cca_form_against_the_bare_line_over_shared_seeds(tmp_path):
    run_timm_train = driver()
    records = [record("vit", "dense", 1, 90.0), record("vit", "scheme", 1, 91.0), record("vit", "scheme", 2, 88.0),
               record("vit", "scheme_cca_output_cross", 1, 93.0), record("vit", "scheme_cca_output_cross", 2, 88.5),
               record("vit", "scheme_cca_output_cross", 3, 80.0)]  # seed 3: no bare-line run to pair with
    run_timm_train.summarise(records, tmp_path, "test machine")
    line = next(x for x in (tmp_path / "results.md").read_text().splitlines() if "scheme_cca_output_cross" in x)
    gaps = [93.0 - 91.0, 88.5 - 88.0]
    *_, minus_dense, minus_bare = line.rstrip(" |").split(" | ")
    assert minus_bare == f"{statistics.mean(gaps):+.1f} ± {statistics.stdev(gaps) / 2 ** 0.5:.1f} (2 seeds)"
    assert minus_dense == "+3.0 (1 seed)"


def test_runs_from_an_earlier_sweep_join_the_table_with_the_machine_each_ran_on(tmp_path):
    run_timm_train = driver()
    earlier = [dict(record("swin", "dense", 1, 94.0), machine="machine A"),
               dict(record("swin", "scheme", 1, 93.0), machine="machine A"),
               dict(record("swin", "scheme", 2, 10.0), machine="machine A")]  # run again below: replaced
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    now = [dict(record("swin", "dense", 2, 92.0), machine="machine B"),
           dict(record("swin", "scheme", 2, 94.5), machine="machine B")]
    merged = run_timm_train.with_earlier(now, [tmp_path / "earlier.json"])
    assert sorted((r["variant"], r["seed"], r["train_py_top1"]) for r in merged) == [
        ("dense", 1, 94.0), ("dense", 2, 92.0), ("scheme", 1, 93.0), ("scheme", 2, 94.5)]
    run_timm_train.summarise(merged, tmp_path, "machine B")
    header = (tmp_path / "results.md").read_text().splitlines()[0]
    assert "On machine A: swin dense s1, swin scheme s1. On machine B: swin dense s2, swin scheme s2." in header
    gaps = [93.0 - 94.0, 94.5 - 92.0]
    assert f"{statistics.mean(gaps):+.1f} ± {statistics.stdev(gaps) / 2 ** 0.5:.1f} (2 seeds)" in \
        (tmp_path / "results.md").read_text()
    # a record without a machine (an older sweep) is put down to the machine named on the command line
    assert run_timm_train.where_run([record("vit", "dense", 1, 97.0)], "machine C") == "machine C"


def test_a_seed_whose_dense_run_ran_on_another_machine_is_left_out_of_the_gap_and_named(tmp_path):
    run_timm_train = driver()
    records = [dict(record("vit", "dense", 1, 97.0), machine="machine A"),
               dict(record("vit", "scheme", 1, 98.0), machine="machine A"),
               record("vit", "dense", 2, 96.0),  # no machine: the one on the command line, machine B
               dict(record("vit", "scheme", 2, 99.0), machine="machine B"),
               dict(record("vit", "dense", 3, 90.0), machine="machine A"),
               dict(record("vit", "scheme", 3, 99.0), machine="machine B")]  # a pair split over two machines
    run_timm_train.summarise(records, tmp_path, "machine B")
    scheme_row = next(line for line in (tmp_path / "results.md").read_text().splitlines() if "| scheme |" in line)
    gaps = [98.0 - 97.0, 99.0 - 96.0]
    expected = f"{statistics.mean(gaps):+.1f} ± {statistics.stdev(gaps) / 2 ** 0.5:.1f} " \
               "(2 seeds; s3 left out: dense ran on another machine)"
    assert scheme_row.rstrip(" |").split(" | ")[-2] == expected
    assert run_timm_train.paired_gap(records[5:], records[4:5], "machine B") == \
        "- (s3 left out: dense ran on another machine)"


def test_driver_refuses_an_earlier_results_file_that_is_not_there(tmp_path, capsys):
    (tmp_path / "train.py").touch()
    (tmp_path / "validate.py").touch()
    with pytest.raises(SystemExit):
        driver().main(["--timm-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--earlier",
                       str(tmp_path / "missing.json")])
    assert f"--earlier {tmp_path / 'missing.json'} is not a file" in capsys.readouterr().err


def test_driver_refuses_a_folder_without_timms_scripts(tmp_path, capsys):
    with pytest.raises(SystemExit):
        driver().main(["--timm-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert f"--timm-dir {tmp_path} has no train.py" in capsys.readouterr().err


def test_mlp_output_norms_loads_dense_and_patched_checkpoints_and_measures_each_mlp(tmp_path):
    """The norms script rebuilds each checkpoint as trained (dense or patched) and reports every MLP's input and
    output norms, recomputed here from the first block's own layers."""
    import argparse as _argparse

    import timm
    import torch

    import timm_scheme

    spec = importlib.util.spec_from_file_location("mlp_output_norms", DROP_IN / "mlp_output_norms.py")
    norms_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(norms_script)
    kwargs = dict(img_size=32, patch_size=8, depth=2, num_classes=3)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for patched in (False, True):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", **kwargs)
        if patched:
            timm_scheme.scheme_patch(model, groups=4, expansion=8)
        args = _argparse.Namespace(model="vit_tiny_patch16_224", num_classes=3, img_size=32,
                                   model_kwargs=dict(patch_size=8, depth=2))
        path = tmp_path / f"{patched}.pth.tar"
        torch.save({"state_dict": model.state_dict(), "args": args}, path)
        loaded, train_args = norms_script.load(path)
        model.eval()
        assert train_args["model"] == "vit_tiny_patch16_224" and not loaded.training
        assert isinstance(loaded.blocks[0].mlp, type(model.blocks[0].mlp))
        with torch.no_grad():
            assert torch.equal(loaded(images), model(images))
            block = model.blocks[0]
            x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
            mlp_in = block.norm2(x + block.ls1(block.attn(block.norm1(x))))
            mlp_out = block.mlp(mlp_in)
        measured = norms_script.mlp_norms(loaded, images)
        assert list(measured) == ["blocks.0.mlp", "blocks.1.mlp"]
        assert measured["blocks.0.mlp"] == pytest.approx((float(mlp_in.norm(dim=-1).mean()),
                                                          float(mlp_out.norm(dim=-1).mean())), rel=1e-5)
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    with pytest.raises(SystemExit, match="does not record its model"):
        norms_script.load(bare)


def test_a_finished_training_is_kept_and_an_unfinished_one_runs_again(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    (train / "args.yaml").write_text("epochs: 3\n")
    (train / "summary.csv").write_text("epoch,train_loss\n0,2.3\n1,2.1\n2,1.9\n")
    finished = driver().finished_training_s
    assert finished(train, 3) is None  # no last checkpoint yet: the run was stopped before its end
    (train / "last.pth.tar").write_bytes(b"weights")
    os.utime(train / "args.yaml", (1000.0, 1000.0))
    os.utime(train / "last.pth.tar", (1600.0, 1600.0))
    assert finished(train, 3) == 600.0  # from the files' own times
    assert finished(train, 4) is None  # fewer epochs than asked for: trained again


def test_the_rows_of_an_earlier_stopped_start_count_neither_as_epochs_nor_as_the_result(tmp_path):
    # train.py appends to the summary of a folder it is started in again, header and all
    train = tmp_path / "train"
    train.mkdir()
    (train / "args.yaml").write_text("epochs: 3\n")
    (train / "last.pth.tar").write_bytes(b"weights")
    header = "epoch,train_loss,eval_top1\n"
    stopped = header + "0,2.3,40.0\n1,2.1,50.0\n"
    run_timm_train = driver()
    (train / "summary.csv").write_text(stopped + header + "0,2.2,45.0\n1,2.0,55.0\n")  # 5 lines after the first header
    assert run_timm_train.finished_training_s(train, 5) is None  # two epochs of the latest start, not five
    assert run_timm_train.finished_training_s(train, 2) is not None
    (train / "summary.csv").write_text(stopped + header + "0,2.2,45.0\n1,2.0,55.0\n2,1.8,60.0\n")
    rows = run_timm_train.epoch_rows(train / "summary.csv")
    assert [(r["epoch"], r["eval_top1"]) for r in rows] == [("0", "45.0"), ("1", "55.0"), ("2", "60.0")]
    assert run_timm_train.finished_training_s(train, 3) is not None


# a stand-in for timm's train.py: writes what train.py writes to --output/--experiment, one row an epoch
FAKE_TRAIN = """
import sys
argv = sys.argv[1:]
value = lambda flag: argv[argv.index(flag) + 1]
from pathlib import Path
out = Path(value("--output")) / value("--experiment")
out.mkdir(parents=True, exist_ok=True)
(out / "args.yaml").write_text("epochs: " + value("--epochs") + "\\n")
with open(out / "summary.csv", "a") as f:
    f.write("epoch,train_loss,eval_loss,eval_top1\\n")
    for epoch in range(int(value("--epochs"))):
        f.write(f"{epoch},{2 - epoch / 4},{1 - epoch / 8},{90 + epoch}.0\\n")
(out / "last.pth.tar").write_bytes(b"weights")
"""


def test_a_stopped_training_is_trained_again_in_a_clean_folder(tmp_path):
    run_timm_train = driver()
    timm_dir = tmp_path / "timm"
    timm_dir.mkdir()
    (timm_dir / "train.py").write_text(FAKE_TRAIN)
    stopped = tmp_path / "out" / "runs" / "vit-dense-s1" / "train"
    stopped.mkdir(parents=True)
    (stopped / "summary.csv").write_text("epoch,train_loss,eval_top1\n0,2.0,10.0\n")  # stopped after one epoch
    (stopped / "checkpoint-0.pth.tar").write_bytes(b"old")
    args = argparse.Namespace(out=tmp_path / "out", timm_dir=timm_dir, epochs=3, machine="machine A")
    record = run_timm_train.one_run(args, "vit", "dense", 1, 100, tmp_path / "data")
    assert (record["epochs"], record["train_py_top1"]) == (3, 92.0)
    # the last epoch's losses as the fake train.py wrote them (epoch 2: 2 - 2/4 and 1 - 2/8)
    assert (record["last_train_loss"], record["last_eval_loss"]) == (1.5, 0.75)
    assert not (stopped / "checkpoint-0.pth.tar").exists()  # the stopped start's files are gone
    summary = (stopped / "summary.csv").read_text()
    assert summary.count("epoch,") == 1 and "10.0" not in summary
    assert "trained again from the start" in (stopped.parent / "log.txt").read_text()
    assert json.loads((stopped.parent / "record.json").read_text()) == record


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_the_plot_of_made_up_runs_is_a_png_with_each_variants_mlp_cost(tmp_path):
    pytest.importorskip("matplotlib")
    run_timm_train = driver()
    records = [record("vit", "dense", 1, 97.0), record("vit", "dense", 2, 96.0),
               dict(record("vit", "scheme", 1, 98.0), options={"groups": 4, "expansion": 8}),
               dict(record("vit", "scheme", 2, 98.0), options={"groups": 4, "expansion": 8}),
               dict(record("vit", "scheme_g2", 1, 97.5), options={"groups": 2, "expansion": 8}),
               dict(record("vit", "scheme_lr_sqrt", 1, 97.2),  # a retired option: no bearing on the cost
                    options={"groups": 4, "expansion": 8, "block_lr_power": 0.5})]
    # the MLP MACs and parameters of the deployed model relative to dense: g=4, E=8 halves both (up to fc1's
    # wider bias), g=2, E=8 is dense's cost
    assert run_timm_train.mlp_cost(records[0]) == (1.0, 1.0)
    macs, params = run_timm_train.mlp_cost(records[2])
    assert macs == 0.5 and params == pytest.approx(0.5, abs=0.01)
    assert run_timm_train.mlp_cost(records[4])[0] == 1.0
    assert run_timm_train.mlp_cost(records[5]) == (macs, params)
    assert run_timm_train.mlp_cost(record("vit", "scheme", 3, 90.0))[0] == 0.5  # no options: the variant's
    path = run_timm_train.plot_accuracy_vs_cost(records, tmp_path / "results.png")
    assert path == tmp_path / "results.png"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    with pytest.raises(ValueError, match="no runs to plot: the records are empty"):
        run_timm_train.plot_accuracy_vs_cost([], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_summarise_only_tabulates_and_plots_a_results_file_without_training(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_timm_train = driver()
    records = [record("vit", "dense", 1, 97.0), dict(record("vit", "scheme", 1, 98.0), machine="machine A"),
               dict(record("vit", "scheme", 2, 96.0), options={"groups": 4, "expansion": 8})]
    run_timm_train.summarise(records, tmp_path, "machine A", stem="sweep")
    table = (tmp_path / "sweep.md").read_text()
    results = tmp_path / "sweep.json"
    (tmp_path / "sweep.md").unlink()
    run_timm_train.main(["--summarise-only", str(results), "--machine", "machine A"])
    assert (tmp_path / "sweep.md").read_text() == table  # the table the sweep wrote
    assert json.loads(results.read_text()) == records
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG_SIGNATURE)
    (tmp_path / "sweep.png").unlink()
    (tmp_path / "sweep.md").write_text("an earlier table\n")
    run_timm_train.main(["--summarise-only", str(results), "--plot-only"])
    assert (tmp_path / "sweep.md").read_text() == "an earlier table\n"  # left as it is
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG_SIGNATURE)
    capsys.readouterr()
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(SystemExit):
        run_timm_train.main(["--summarise-only", str(tmp_path / "empty.json")])
    assert f"--summarise-only {tmp_path / 'empty.json'} holds no runs" in capsys.readouterr().err
    assert not (tmp_path / "empty.md").exists() and not (tmp_path / "empty.png").exists()
    with pytest.raises(SystemExit):
        run_timm_train.main(["--out", str(tmp_path / "out")])  # neither a timm checkout nor results to tabulate
    assert "--timm-dir (or --summarise-only)" in capsys.readouterr().err
