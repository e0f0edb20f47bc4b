"""timm's own train.py and validate.py with the one-line SCHEME patch: the evidence for "drop-in".

For each family (a ViT, a Swin, a MetaFormer), variant and seed, on scikit-learn's digits written as a 32 px PNG
image folder:
1. timm's ``train.py`` (from a timm checkout given by ``--timm-dir``, run unchanged through ``with_patch.py``),
   the variant's ``scheme_patch`` line added after its ``create_model`` (none for ``dense``);
2. ``timm-scheme export`` of its ``last.pth.tar`` (fused; preprocessing taken from train.py's args);
3. timm's ``validate.py`` on ``local-dir:<export>`` (after ``import timm_scheme``);
4. the function that was trained (CCA applied, no dropout) on the same validation images.

    python examples/drop_in/run_timm_train.py --timm-dir ~/src/pytorch-image-models --out out/drop_in --jobs 2

Results: ``<out>/results.json`` (every run), ``<out>/results.md`` (mean and per seed) and ``<out>/results.png``
(top-1 against the MLP cost, per family). Finished runs are kept, so an interrupted sweep continues where it stopped
(a run whose training had finished is not trained again; one stopped mid-training is trained again from the start, in
a clean folder).

The table and the plot of results files kept from earlier sweeps, without training (each written next to its file,
``.md`` and ``.png`` of the same name; ``--machine`` names where the runs that record none ran):

    python examples/drop_in/run_timm_train.py --summarise-only examples/results/drop_in_60_epochs.json --machine "..."

(``--plot-only`` as well: the plot alone, the table left as it is.)
"""
from __future__ import annotations

import argparse
import ast
import copy
import csv
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
IMG_SIZE, BATCH, TRAIN_FRACTION = 32, 32, 0.75

# the recipe every run here shares (AdamW 5e-4, 2 warm-up epochs, cosine, clip 1.0, batch 32), with the augmentation
# digits allow: no horizontal flip, crops of at least half the image (train.py's defaults, flips and 8% crops,
# left the dense ViT at 48% after 12 epochs)
RECIPE = ["--device", "cpu", "--workers", "1", "--no-prefetcher", "--num-classes", "10", "--input-size", "3", "32",
          "32", "--batch-size", str(BATCH), "--opt", "adamw", "--lr", "5e-4", "--weight-decay", "0.05",
          "--warmup-epochs", "2", "--sched", "cosine", "--clip-grad", "1.0", "--mean", "0.5", "0.5", "0.5",
          "--std", "0.5", "0.5", "0.5", "--hflip", "0", "--scale", "0.5", "1.0", "--train-split", "train",
          "--val-split", "validation", "--checkpoint-hist", "1", "--log-interval", "1000"]
FAMILIES = {
    "vit": ["--model", "deit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=4", "depth=4"],
    "swin": ["--model", "swin_tiny_patch4_window7_224", "--model-kwargs", "img_size=32", "patch_size=2",
             "window_size=4", "depths=(2,2)", "num_heads=(3,6)"],
    "metaformer": ["--model", "caformer_s18"],
    # Swin without its stochastic depth (timm's default drop_path_rate 0.1; the ViT and CAFormer here have none)
    "swin_no_drop_path": ["--model", "swin_tiny_patch4_window7_224", "--model-kwargs", "img_size=32", "patch_size=2",
                          "window_size=4", "depths=(2,2)", "num_heads=(3,6)", "--drop-path", "0"],
}
# variant -> the scheme_patch keyword arguments of the added line (None: no line, the dense model);
# "{steps}" stands for the run's optimizer steps (epochs x updates per epoch)
VARIANTS: Dict[str, Optional[Dict[str, Any]]] = {
    "dense": None,
    "scheme": {"groups": 4, "expansion": 8},                     # the bare line: the block-diagonal MLP alone
    "scheme_cca": {"groups": 4, "expansion": 8, "cca": True},    # with CCA, faded out with the learning rate
    "scheme_cca_steps": {"groups": 4, "expansion": 8, "cca": True, "cca_anneal_steps": "{steps}"},
    "scheme_cca_paper": {"groups": 4, "expansion": 8, "cca": True, "cca_anneal": "off"},
    # the CCA options the default was chosen among (measured on ViT and Swin, seed 1)
    "scheme_cca_alpha09": {"groups": 4, "expansion": 8, "cca": True, "alpha_init": 0.9},
    "scheme_cca_floor05": {"groups": 4, "expansion": 8, "cca": True, "cca_lr_floor": 0.5},
    "scheme_cca_early": {"groups": 4, "expansion": 8, "cca": True, "alpha_init": 0.9, "cca_lr_floor": 0.5},
    "scheme_cca_normalized": {"groups": 4, "expansion": 8, "cca": True, "cca_scale_mode": "normalized"},
    # the forms of the branch (SchemeConfig.cca_form), faded out with the learning rate; "_free": the learnt
    # weight alone (no annealing), to see whether it falls by itself
    "scheme_cca_authors": {"groups": 4, "expansion": 8, "cca": True, "cca_form": "authors"},
    "scheme_cca_rescaled": {"groups": 4, "expansion": 8, "cca": True, "cca_form": "rescaled"},
    "scheme_cca_output": {"groups": 4, "expansion": 8, "cca": True, "cca_form": "output"},
    "scheme_cca_output_cross": {"groups": 4, "expansion": 8, "cca": True, "cca_form": "output_cross"},
    "scheme_cca_output_cross_normalized": {"groups": 4, "expansion": 8, "cca": True, "cca_form": "output_cross",
                                           "cca_scale_mode": "normalized"},
    "scheme_cca_output_cross_alpha09": {"groups": 4, "expansion": 8, "cca": True, "cca_form": "output_cross",
                                        "alpha_init": 0.9},
    "scheme_cca_output_free": {"groups": 4, "expansion": 8, "cca": True, "cca_form": "output", "cca_anneal": "off"},
    "scheme_cca_output_cross_free": {"groups": 4, "expansion": 8, "cca": True, "cca_form": "output_cross",
                                     "cca_anneal": "off"},
    # fewer, wider groups: how much of a gap to dense is the group restriction (measured on Swin)
    "scheme_g2": {"groups": 2, "expansion": 8},
    # one group at dense's width: the dense MLP rebuilt by the patch, a control that the patch's init, kernels
    # and optimizer treatment train as timm's own layers do (measured on Swin)
    "scheme_g1_e4": {"groups": 1, "expansion": 4},
    # twice the expansion: the block-diagonal MLP at the dense MLP's parameters and FLOPs (g=4, E=16 against
    # dense E=4), where the paper compares them (measured on Swin)
    "scheme_e16": {"groups": 4, "expansion": 16},
    # one Swin stage patched, the other left dense ("only": a module-name prefix for the line's filter_fn):
    # where a gap to dense comes from
    "scheme_first_stage": {"groups": 4, "expansion": 8, "only": "layers.0."},
    "scheme_second_stage": {"groups": 4, "expansion": 8, "only": "layers.1."},
    # fc2's groups read every fc1 group (channel shuffle): mixing across groups at no extra cost
    "scheme_shuffle": {"groups": 4, "expansion": 8, "channel_shuffle": True},
}
# variants of options since removed (they measured no gain): their earlier results still join the tables (--earlier)
RETIRED_VARIANTS = ("scheme_lr_sqrt", "scheme_lr_fan_in", "scheme_mult_sqrt")
# the families' names in the plot
FAMILY_LABELS = {"vit": "ViT (DeiT-Tiny, depth 4)", "swin": "Swin (2 stages)", "metaformer": "CAFormer-S18",
                 "swin_no_drop_path": "Swin without stochastic depth"}
# the scheme_patch options that shape the deployed MLP, what its cost depends on (the CCA branch is fused away; the
# other options act on training only)
COST_OPTIONS = ("groups", "expansion", "channel_shuffle", "skip_unfit")


def make_digits(root: Path) -> int:
    """The digits as a timm image folder: train/ and validation/ with one subfolder per class. Returns the
    number of training images."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    done = root / ".complete"
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0))
    n_train = len(order) - int(len(order) * (1 - TRAIN_FRACTION))
    if done.is_file():
        return n_train
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMG_SIZE, IMG_SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    n_val = len(order) - n_train
    for split, indices in (("validation", order[:n_val]), ("train", order[n_val:])):
        for i in indices.tolist():
            folder = root / split / str(int(digits.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (images[i, 0].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").save(folder / f"{i:04d}.png")
    done.touch()
    return n_train


def run(cmd: List[str], log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=True, cwd=ROOT)


def export_flags(options: Dict[str, Any]) -> List[str]:
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


class Checkpoint:
    """A train.py checkpoint as the model it trained (patched alike, weights loaded, eval mode), and the digits
    splits preprocessed as train.py evaluated."""

    def __init__(self, path: Path, options: Dict[str, Any], data: Path):
        import torch
        from timm.data import resolve_data_config

        from timm_scheme.io.training_checkpoint import rebuild

        torch.set_num_threads(1)
        rebuilt = rebuild(path, scheme_options=options)
        self.model = rebuilt.model.eval()
        self.config = resolve_data_config(rebuilt.info["args"], model=self.model)
        self.data = data

    def loader(self, split: str, batch_size: int = 256):
        """The split in folder order, preprocessed as train.py evaluated."""
        import torch
        from timm.data import create_dataset, create_loader

        c = self.config
        return create_loader(create_dataset("", root=str(self.data), split=split), input_size=c["input_size"],
                             batch_size=batch_size, interpolation=c["interpolation"], mean=c["mean"], std=c["std"],
                             crop_pct=c["crop_pct"], num_workers=0, device=torch.device("cpu"))

    def top1(self) -> float:
        from timm_scheme.training import evaluate

        return evaluate(self.model, self.loader("validation"))[1]


def trained_function_top1(checkpoint: Path, options: Dict[str, Any], data: Path) -> Dict[str, float]:
    """Top-1 of the checkpoint's model with CCA applied (the function train.py optimised, without dropout) and
    without (the eval / deployed function), on the validation split, preprocessed as train.py evaluated."""
    import timm_scheme

    run_of = Checkpoint(checkpoint, options, data)
    with timm_scheme.cca_in_eval(run_of.model):
        trained = run_of.top1()
    weights = timm_scheme.cca_weights(run_of.model).values()
    return dict(trained_function=trained, eval_function=run_of.top1(),
                cca_weight_mean=statistics.mean(weights) if weights else 0.0)


def calibrated_fused_top1(checkpoint: Path, options: Dict[str, Any], data: Path, images: int = 256) -> float:
    """Top-1 of the checkpoint fused with calibration: fc2 refit to the training-time function (CCA applied) on
    ``images`` training images drawn at random, preprocessed as for evaluation."""
    import timm_scheme

    import torch
    from timm.data import create_dataset, create_transform

    run_of = Checkpoint(checkpoint, options, data)
    train = create_dataset("", root=str(data), split="train")
    train.transform = create_transform(**run_of.config)  # evaluation's preprocessing, no augmentation
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:images]  # every class
    calibration = torch.stack([train[int(i)][0] for i in chosen])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the discarded CCA weight: what this measures
        timm_scheme.fuse_for_inference(run_of.model, calibration_data=calibration)
    return run_of.top1()


def one_run(args: argparse.Namespace, family: str, variant: str, seed: int, steps: int, data: Path) -> Dict[str, Any]:
    name = f"{family}-{variant}-s{seed}"
    folder = args.out / "runs" / name
    record_path = folder / "record.json"
    if record_path.is_file():
        return with_calibrated(json.loads(record_path.read_text()), folder, data)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "log.txt"
    options = VARIANTS[variant]
    only = None
    if options is not None:
        options = {k: (steps if v == "{steps}" else v) for k, v in options.items()}
        only = options.pop("only", None)  # the export reads which MLPs were patched off the weights
    started = time.time()
    trained_s = finished_training_s(folder / "train", args.epochs)
    if trained_s is None:
        if (folder / "train").exists():  # a start stopped before its end: train.py starts afresh in a clean folder
            shutil.rmtree(folder / "train")
            with open(log, "a") as f:
                f.write("training stopped before its end earlier: its folder removed, trained again from the start\n")
        patch = ["--scheme", json.dumps(options)] if options is not None else []
        patch += ["--only", only] if only is not None else []
        run([sys.executable, str(HERE / "with_patch.py"), *patch, str(args.timm_dir / "train.py"), str(data),
             *RECIPE, *FAMILIES[family], "--epochs", str(args.epochs), "--seed", str(seed), "--output", str(folder),
             "--experiment", "train"], log)
    else:  # a sweep stopped after this run's training: the steps after it only
        with open(log, "a") as f:
            f.write(f"training finished earlier ({trained_s:.0f} s by its files' times): kept\n")
        started -= trained_s
    rows = epoch_rows(folder / "train" / "summary.csv")
    record: Dict[str, Any] = dict(family=family, variant=variant, seed=seed, options=options,
                                  train_py_top1=float(rows[-1]["eval_top1"]), epochs=len(rows), machine=args.machine,
                                  **last_losses(rows))
    if only is not None:
        record["patched_only"] = only
    if options is not None:
        checkpoint = folder / "train" / "last.pth.tar"
        export = folder / "export"
        run([sys.executable, "-m", "timm_scheme.cli", "export", "--checkpoint", str(checkpoint), "--output",
             str(export), "--overwrite", *export_flags(options)], log)
        results = folder / "validate.json"
        run([sys.executable, str(HERE / "with_patch.py"), str(args.timm_dir / "validate.py"), str(data), "--model",
             f"local-dir:{export}", "--pretrained", "--device", "cpu", "--workers", "1", "--batch-size", "256",
             "--split", "validation", "--results-file", str(results), "--results-format", "json"], log)
        record["fused_validate_py_top1"] = float(json.loads(results.read_text())["top1"])
        record.update(trained_function_top1(checkpoint, options, data))
    record["time_s"] = round(time.time() - started, 1)
    record = with_calibrated(record, folder, data)
    print(f"{name}: {record}", flush=True)
    return record


def epoch_rows(summary: Path) -> List[Dict[str, str]]:
    """The rows train.py wrote to ``summary.csv`` in its latest start. train.py appends to the summary of a folder
    it is started in again, header and all: the rows of an earlier, stopped start must count neither as epochs nor
    as the final result."""
    with open(summary) as f:
        lines = f.read().splitlines()
    header = max((i for i, line in enumerate(lines) if line.startswith("epoch,")), default=0)
    return list(csv.DictReader(lines[header:]))


def last_losses(rows: List[Dict[str, str]]) -> Dict[str, float]:
    """The last epoch's training and validation loss as train.py logged them: whether a line underfits or
    overfits, kept in the record because the run folders are not."""
    return {"last_train_loss": float(rows[-1]["train_loss"]), "last_eval_loss": float(rows[-1]["eval_loss"])}


def finished_training_s(train_dir: Path, epochs: int) -> Optional[float]:
    """Seconds a finished train.py run took (its args.yaml to its last checkpoint), or None when it has not
    finished all ``epochs`` (then it is run again from the start)."""
    summary, last, started = train_dir / "summary.csv", train_dir / "last.pth.tar", train_dir / "args.yaml"
    if not (summary.is_file() and last.is_file() and started.is_file()):
        return None
    if [int(r["epoch"]) for r in epoch_rows(summary)] != list(range(epochs)):
        return None
    return last.stat().st_mtime - started.stat().st_mtime


def with_calibrated(record: Dict[str, Any], folder: Path, data: Path) -> Dict[str, Any]:
    """Adds the calibrated-fusing top-1 to a run that ended with CCA still weighing (e.g. trained without
    annealing), and writes the record."""
    if record.get("cca_weight_mean", 0.0) > 0.01 and "fused_calibrated_top1" not in record:
        record["fused_calibrated_top1"] = calibrated_fused_top1(folder / "train" / "last.pth.tar", record["options"],
                                                                data)
    (folder / "record.json").write_text(json.dumps(record, indent=2))
    return record


def paired_gap(rows: List[Dict[str, Any]], reference: List[Dict[str, Any]], machine: str = "",
               reference_name: str = "dense") -> str:
    """Mean over the seeds both have of (variant - reference) train.py top-1, with its standard error: whether a
    gap stands out of the seeds' spread. A seed pairs only where both runs ran on one machine (a record without one
    ran on ``machine``): the same seed gives other figures on another CPU or math library."""
    ran_on = lambda r: r.get("machine") or machine  # noqa: E731
    reference_of = {r["seed"]: r for r in reference}
    gaps, elsewhere = [], []
    for r in rows:
        if r in reference or r["seed"] not in reference_of:
            continue
        if ran_on(r) != ran_on(reference_of[r["seed"]]):
            elsewhere.append(f"s{r['seed']}")
            continue
        gaps.append(r["train_py_top1"] - reference_of[r["seed"]]["train_py_top1"])
    left_out = f"{', '.join(elsewhere)} left out: {reference_name} ran on another machine" if elsewhere else ""
    note = f"; {left_out}" if left_out else ""
    if not gaps:
        return f"- ({left_out})" if left_out else "-"
    if len(gaps) == 1:
        return f"{gaps[0]:+.1f} (1 seed{note})"
    error = statistics.stdev(gaps) / len(gaps) ** 0.5
    return f"{statistics.mean(gaps):+.1f} ± {error:.1f} ({len(gaps)} seeds{note})"


def where_run(records: List[Dict[str, Any]], machine: str) -> str:
    """The machine the runs ran on, or, where they ran on several (a sweep continued elsewhere), which runs ran
    where: paired seeds compare on one machine only when dense and the variant ran on the same."""
    runs_on: Dict[str, List[str]] = {}
    for r in sorted(records, key=lambda r: (r["family"], r["seed"], r["variant"])):
        runs_on.setdefault(r.get("machine") or machine, []).append(f"{r['family']} {r['variant']} s{r['seed']}")
    if len(runs_on) <= 1:
        return next(iter(runs_on), machine)
    return " ".join(f"On {m or 'an unnamed machine'}: {', '.join(runs)}." for m, runs in runs_on.items())


def with_earlier(records: List[Dict[str, Any]], earlier: List[Path]) -> List[Dict[str, Any]]:
    """``records`` plus the runs of earlier sweeps' results.json (whose run folders are gone) that they do not
    hold again."""
    key = lambda r: (r["family"], r["variant"], r["seed"], r["epochs"])  # noqa: E731
    merged = {key(r): r for path in earlier for r in json.loads(path.read_text())}
    merged.update({key(r): r for r in records})
    return list(merged.values())


def summarise(records: List[Dict[str, Any]], out: Path, machine: str, stem: str = "results",
              write_records: bool = True) -> None:
    """The results table, ``<out>/<stem>.md`` (and the runs, ``<out>/<stem>.json``, unless ``write_records`` is
    False: when they were read from there)."""
    if write_records:
        (out / f"{stem}.json").write_text(json.dumps(records, indent=2))
    where = where_run(records, machine)
    columns = [("train_py_top1", "train.py eval (deployed function)"),
               ("trained_function", "trained function (CCA applied)"),
               ("fused_validate_py_top1", "fused, validate.py on local-dir"),
               ("fused_calibrated_top1", "fused with calibration (256 train images)")]
    epochs = "/".join(str(e) for e in sorted({r["epochs"] for r in records}))
    lines = [f"Validation top-1 (%) on digits after {epochs} epochs, mean of seeds (per seed). {where}", "",
             "| family | variant | " + " | ".join(label for _, label in columns)
             + " | deployed minus dense, same seeds | deployed minus the bare line (scheme), same seeds |",
             "|---|---|" + "---|" * (len(columns) + 2)]
    keys = sorted({(r["family"], r["variant"]) for r in records},
                  key=lambda k: (list(FAMILIES).index(k[0]), [*VARIANTS, *RETIRED_VARIANTS].index(k[1])))
    for family, variant in keys:
        rows = sorted((r for r in records if r["family"] == family and r["variant"] == variant), key=lambda r: r["seed"])
        cells = []
        for key, _ in columns:
            values = [r[key] for r in rows if key in r]
            cells.append(f"{statistics.mean(values):.1f} ({' / '.join(f'{v:.1f}' for v in values)})" if values else "-")
        of = lambda name: [r for r in records if r["family"] == family and r["variant"] == name]  # noqa: E731
        cells.append(paired_gap(rows, of("dense"), machine))
        cells.append(paired_gap(rows, of("scheme"), machine, "the bare line") if variant != "dense" else "-")
        lines.append(f"| {family} | {variant} | " + " | ".join(cells) + " |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def family_model(family: str):
    """The family's dense model as train.py builds it from the driver's ``--model`` and ``--model-kwargs`` (values
    read as train.py reads them), for digits' 10 classes."""
    import timm

    args = FAMILIES[family]
    kwargs: Dict[str, Any] = {}
    if "--model-kwargs" in args:
        for item in args[args.index("--model-kwargs") + 1:]:
            if item.startswith("--"):
                break
            key, value = item.split("=", 1)
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
    return timm.create_model(args[args.index("--model") + 1], num_classes=10, **kwargs)


@functools.lru_cache(maxsize=None)
def _dense_mlp_cost(family: str) -> Tuple[Any, Tuple[str, ...], int, int, int]:
    """The family's dense model, its MLPs' names, the MACs of everything but the MLPs, and the MLPs' MACs and
    parameters."""
    from torch import nn

    import timm_scheme
    from timm_scheme.stats import count_macs, count_mlp_params

    model = family_model(family).eval()
    names = tuple(name for name, _ in timm_scheme.find_mlps(model))
    without_mlps = copy.deepcopy(model)
    for name in names:
        without_mlps.set_submodule(name, nn.Identity())
    rest = count_macs(without_mlps, (3, IMG_SIZE, IMG_SIZE))
    return model, names, rest, count_macs(model, (3, IMG_SIZE, IMG_SIZE)) - rest, count_mlp_params(model, names)


@functools.lru_cache(maxsize=None)
def _mlp_cost(family: str, options_json: str, only: Optional[str]) -> Tuple[float, float]:
    import timm_scheme
    from timm_scheme.stats import count_macs, count_mlp_params

    model, names, rest, dense_macs, dense_params = _dense_mlp_cost(family)
    options = json.loads(options_json)
    if options is None:
        return 1.0, 1.0
    shape = {k: v for k, v in options.items() if k in COST_OPTIONS}
    if only is not None:
        shape["filter_fn"] = lambda module, name: name.startswith(only)
    patched = timm_scheme.scheme_patch(copy.deepcopy(model), **shape).eval()
    macs = count_macs(patched, (3, IMG_SIZE, IMG_SIZE)) - rest  # the rest of the model is left as it was
    return macs / dense_macs, count_mlp_params(patched, names) / dense_params


def mlp_cost(record: Dict[str, Any]) -> Tuple[float, float]:
    """The MLP MACs per image (at the driver's 32 px) and the MLP parameters of a run's deployed model (its CCA
    branch fused away), each relative to the family's dense model: counted with ``timm_scheme.stats`` on the
    family's model as the driver configures it, patched with the run's options (the variant's, where a record
    holds none)."""
    options = record.get("options")
    if options is None and record["variant"] != "dense":
        options = dict(VARIANTS.get(record["variant"]) or {})
        only = options.pop("only", None)
    else:
        only = record.get("patched_only")
    return _mlp_cost(record["family"], json.dumps(options, sort_keys=True), only)


def plot_accuracy_vs_cost(records: List[Dict[str, Any]], path: Path) -> Path:
    """Per family, train.py's top-1 of each variant (mean over seeds, each seed a dot) against its MLP MACs per
    image relative to dense (``mlp_cost``), written to ``path`` (a PNG). Variants of equal cost stand side by side
    around it; a dashed line marks dense's mean."""
    families = [f for f in FAMILIES if any(r["family"] == f for r in records)]
    if not families:
        raise ValueError("no runs to plot: the records are empty" if not records else
                         f"no runs of a known family to plot (families {sorted({r['family'] for r in records})}, "
                         f"expected some of {list(FAMILIES)})")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    order = [*VARIANTS, *RETIRED_VARIANTS]
    variants = sorted({r["variant"] for r in records}, key=lambda v: (order.index(v) if v in order else len(order), v))
    palette = plt.get_cmap("tab20").colors
    others = [v for v in variants if v != "dense"]
    style = {v: dict(color=palette[(2 * i) % 20 if len(others) <= 10 else i % 20], marker="osD^v<>ph*"[i % 10])
             for i, v in enumerate(others)}
    style["dense"] = dict(color="black", marker="s")
    epochs = "/".join(str(e) for e in sorted({r["epochs"] for r in records}))
    fig, axes = plt.subplots(1, len(families), figsize=(max(4.4 * len(families), 5.6), 4.6), squeeze=False)
    for ax, family in zip(axes[0], families):
        runs = [r for r in records if r["family"] == family]
        present = [v for v in variants if any(r["variant"] == v for r in runs)]
        cost = {v: mlp_cost(next(r for r in runs if r["variant"] == v))[0] for v in present}
        at_cost: Dict[float, List[str]] = {}
        for v in present:
            at_cost.setdefault(round(cost[v], 3), []).append(v)
        for x, side_by_side in at_cost.items():
            step = min(0.03, 0.2 / max(len(side_by_side) - 1, 1))
            for i, v in enumerate(side_by_side):
                offset = (i - (len(side_by_side) - 1) / 2) * step
                top1 = [r["train_py_top1"] for r in sorted(runs, key=lambda r: r["seed"]) if r["variant"] == v]
                spread = [0.35 * step * (2 * j / (len(top1) - 1) - 1) if len(top1) > 1 else 0.0
                          for j in range(len(top1))]  # seeds of equal top-1 side by side, not on one another
                ax.scatter([x + offset + d for d in spread], top1, s=14, facecolors="none",
                           edgecolors=style[v]["color"], linewidths=0.8, alpha=0.8, zorder=4)  # over the mean
                ax.scatter([x + offset], [statistics.mean(top1)], s=60, color=style[v]["color"],
                           marker=style[v]["marker"], edgecolors="black", linewidths=0.6, zorder=3)
        if "dense" in present:
            ax.axhline(statistics.mean(r["train_py_top1"] for r in runs if r["variant"] == "dense"), color="grey",
                       linestyle="--", linewidth=0.8, zorder=1)
        ticks = sorted(at_cost)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlim(min(ticks) - 0.2, max(ticks) + 0.2)
        ax.set_title(FAMILY_LABELS.get(family, family), fontsize=10)
        ax.set_xlabel("MLP MACs per image, relative to dense")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("train.py validation top-1 (%)")
    handles = [Line2D([], [], linestyle="none", markeredgecolor="black", markersize=7,
                      markerfacecolor=style[v]["color"], marker=style[v]["marker"], label=v) for v in variants]
    handles.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="none", markeredgecolor="grey",
                          markersize=4, label="one seed"))
    columns = min(len(handles), max(2, int(fig.get_figwidth() / 2.8)))  # room for the longest variant names
    rows = -(-len(handles) // columns)
    legend_height = 0.2 * rows + 0.25  # inches
    fig.set_size_inches(fig.get_figwidth(), 4.6 + legend_height)
    fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.suptitle(textwrap.fill(f"Digits, {epochs} epochs, timm's train.py: top-1 against the deployed MLPs' cost "
                               "(mean of seeds; dashed: dense)", int(fig.get_figwidth() * 10)), fontsize=11)
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(records: List[Dict[str, Any]], out: Path, machine: str, stem: str = "results",
           write_records: bool = True) -> None:
    """The results table (``summarise``) and, next to it, the plot (``plot_accuracy_vs_cost``; left out, saying
    why, where matplotlib is not installed)."""
    summarise(records, out, machine, stem, write_records)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {out / f'{stem}.png'}")
        return
    print(f"wrote {plot_accuracy_vs_cost(records, out / f'{stem}.png')}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-dir", type=Path, help="timm checkout holding train.py and validate.py")
    parser.add_argument("--out", type=Path, default=Path("out/drop_in"))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES)[:3], choices=list(FAMILIES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS)[:5], choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--machine", default="", help="where it ran, for the results table")
    parser.add_argument("--earlier", nargs="*", type=Path, default=[],
                        help="results.json of earlier sweeps whose run folders are gone (e.g. on another machine): "
                             "their runs join the table unless this sweep has them")
    parser.add_argument("--summarise-only", nargs="+", type=Path, default=None, metavar="RESULTS_JSON",
                        help="train nothing: write the table and the plot of each results file (e.g. "
                             "examples/results/drop_in_60_epochs.json) next to it, as <name>.md and <name>.png")
    parser.add_argument("--plot-only", action="store_true",
                        help="with --summarise-only: the plot alone, a table already there left as it is")
    args = parser.parse_args(argv)
    if args.plot_only and args.summarise_only is None:
        parser.error("--plot-only goes with --summarise-only RESULTS_JSON")
    if args.summarise_only is not None:
        runs = {}
        for path in args.summarise_only:
            if not path.is_file():
                parser.error(f"--summarise-only {path} is not a file; give a results .json a sweep wrote")
            runs[path] = json.loads(path.read_text())
            if not runs[path]:
                parser.error(f"--summarise-only {path} holds no runs: nothing to tabulate or plot")
        for path, records in runs.items():
            if args.plot_only:
                print(f"wrote {plot_accuracy_vs_cost(records, path.with_suffix('.png'))}")
            else:
                report(records, path.parent, args.machine, path.stem, write_records=False)
        return
    if args.timm_dir is None:
        parser.error("the following arguments are required: --timm-dir (or --summarise-only)")
    for script in ("train.py", "validate.py"):
        if not (args.timm_dir / script).is_file():
            parser.error(f"--timm-dir {args.timm_dir} has no {script}; point it at a checkout of timm's repository")
    for path in args.earlier:
        if not path.is_file():
            parser.error(f"--earlier {path} is not a file; give the results.json an earlier sweep wrote")
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "digits32"
    n_train = make_digits(data)
    steps = args.epochs * (n_train // BATCH)  # train.py's training loader drops the last partial batch
    jobs = [(f, v, s) for s in args.seeds for f in args.families for v in args.variants]
    with ThreadPoolExecutor(args.jobs) as pool:
        records = list(pool.map(lambda job: one_run(args, *job, steps, data), jobs))
    every = [json.loads(p.read_text()) for p in sorted((args.out / "runs").glob("*/record.json"))]
    report(with_earlier(every, args.earlier), args.out, args.machine)


if __name__ == "__main__":
    main()
