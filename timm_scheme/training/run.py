"""A whole ``timm-scheme train`` run: any timm model, patched, trained with timm's factories on the digits or
an image folder (one DDP replica per process under torchrun), then evaluated as trained, fused, verified and
exported as a timm checkpoint folder.

Writes to ``args.output``: ``log.csv`` and ``log.json`` (per epoch: top-1, loss, lr, per-layer 1 - alpha,
the CCA branch's share of the mixers' output and its cross-group attention on a fixed batch),
``checkpoint.pth`` (resumable with ``--resume``), ``summary.json`` and ``export/`` (the fused model). Under
torchrun rank 0 alone writes.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import timm
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import random_seed
from torch import nn

from ..config import SchemeConfig
from ..diagnostics import cca_diagnostics, summarize
from .distributed import Processes, check_ranks_agree, end_processes, replicate, start_processes
from ..fuse import FuseVerificationError, fuse_for_inference
from ..io import CheckpointFormatError, read_training_checkpoint, save_pretrained
from ..mixers import cca_in_eval, cca_weights, is_patched, scheme_mixers
from ..patching.patch import scheme_patch
from ..stats import count_macs, count_params
from .data import Data, load_data, mixup_from
from .loop import evaluate, train_one_epoch

_logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pth"
DIAGNOSTIC_IMAGES = 32  # the fixed batch the per-epoch CCA diagnostics read


def run(args: argparse.Namespace) -> int:
    """Train, then fuse, verify and export; returns 0 when the fused model matches the unfused one.
    Launched by torchrun with WORLD_SIZE > 1, each process trains one DDP replica and rank 0 alone writes."""
    processes = start_processes()
    try:
        return _run(args, processes)
    finally:
        end_processes(processes)


def _run(args: argparse.Namespace, processes: Processes) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    if processes.is_main:
        out.mkdir(parents=True, exist_ok=True)
    else:
        logging.getLogger("timm_scheme").setLevel(logging.WARNING)  # rank 0 tells the story once
    random_seed(args.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)

    data = load_data(args, processes)
    updates_per_epoch = len(data.train_loader(0))
    model = build_model(args, data.num_classes, data.input_size, data, total_updates=args.epochs * updates_per_epoch)
    recorded_args = _recorded_args(args, model)
    recorded_args["world_size"] = processes.world_size
    # the preprocessing, as timm's train script records it: `timm-scheme export` carries it into pretrained_cfg
    recorded_args.update({k: v for k, v in (data.data_config or {}).items()
                          if k in ("input_size", "mean", "std", "crop_pct", "interpolation")})
    model.to(processes.device)

    optimizer = create_optimizer_v2(model, args.opt, lr=args.lr, weight_decay=args.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    mixup = mixup_from(args, data.num_classes)
    train_loss_fn = SoftTargetCrossEntropy() if mixup is not None else (
        LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss())

    history: List[Dict[str, Any]] = []
    start_epoch = 0
    if args.resume:
        start_epoch, history = _load_checkpoint(args.resume, model, optimizer, scheduler, processes.world_size)
        _logger.info("resumed from %s at epoch %d", args.resume, start_epoch)
    replica = replicate(model, processes)
    probe = data.calibration_images(DIAGNOSTIC_IMAGES).to(processes.device) if _has_cca(model) else None
    if probe is not None and processes.is_main:
        _logger.info("at start: %s", summarize(cca_diagnostics(model, probe)))

    for epoch in range(start_epoch, args.epochs):
        # a resumed run repeats the uninterrupted one; ranks draw different augmentations and dropout
        random_seed(processes.rank_seed(args.seed * 10_000 + epoch))
        started = time.perf_counter()
        train_loss = train_one_epoch(
            replica, data.train_loader(epoch), optimizer, train_loss_fn, scheduler=scheduler,
            first_update=epoch * updates_per_epoch, clip_grad=args.clip_grad, mixup=mixup,
            batch_augment=data.batch_augment, progress=not args.no_progress and processes.is_main,
            desc=f"epoch {epoch + 1}/{args.epochs}", device=processes.device)
        train_loss = processes.mean(train_loss)
        # the unwrapped model: evaluation needs no gradient sync, and the ranks' shards may differ in batches
        eval_loss, top1 = evaluate(model, data.eval_loader(shard=processes.distributed),
                                   across_processes=processes.distributed)
        check_ranks_agree(model, processes)
        record = dict(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"], train_loss=train_loss,
                      eval_loss=eval_loss, top1=top1, time_s=time.perf_counter() - started, **cca_state(model))
        diagnostics = cca_diagnostics(model, probe, warn=False) if probe is not None and processes.is_main else {}
        if diagnostics:  # on a fixed batch: how much of the mixers' output CCA carries, and across which groups
            record.update(cca_share_mean=_mean(d.cca_share for d in diagnostics.values()),
                          cca_cross_group_mass_mean=_mean(d.cross_group_mass for d in diagnostics.values()))
        history.append(record)
        if processes.is_main:
            _write_logs(out, recorded_args, history)
            _save_checkpoint(out / CHECKPOINT, model, optimizer, scheduler, epoch + 1, history, recorded_args)
        _logger.info("epoch %d/%d  train loss %.4f  eval loss %.4f  top-1 %.2f%%  mean 1-alpha %.4f  %.1fs",
                     epoch + 1, args.epochs, train_loss, eval_loss, top1, record["cca_weight_mean"],
                     record["time_s"])
        if diagnostics:
            _logger.info("  %s", summarize(diagnostics))
        if args.stop_after is not None and epoch + 1 >= args.stop_after and epoch + 1 < args.epochs:
            _logger.info("stopped after epoch %d of %d (--stop-after); continue with --resume %s",
                         epoch + 1, args.epochs, out / CHECKPOINT)
            return 0

    # the process group ends with training: fusing, verifying and exporting one copy of the weights is rank
    # 0's alone, and no rank should sit in a collective while rank 0 evaluates
    end_processes(processes, wait=True)
    if not processes.is_main:
        return 0
    model.to("cpu")
    summary = finish(model, data, args, history)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _logger.info("summary written to %s", out / "summary.json")
    return 0 if summary.get("verified", True) else 1


# --- the model -------------------------------------------------------------------------------------------

def build_model(args: argparse.Namespace, num_classes: int, input_size: Optional[Tuple[int, int, int]],
                data: Optional[Data] = None, total_updates: Optional[int] = None) -> nn.Module:
    """``timm.create_model`` for the data at hand (with its transforms attached to ``data``), then
    ``scheme_patch`` unless the model already is SCHEME; ``init=dense`` converts on ``data``'s images.
    With ``--cca-anneal-start``, CCA is annealed over ``total_updates`` optimizer steps."""
    kwargs = dict(num_classes=num_classes, in_chans=3, **args.model_kwargs)
    if args.drop_path:
        kwargs["drop_path_rate"] = args.drop_path
    optional = {}
    if input_size is not None:
        optional["img_size"] = input_size[1]
    if args.data_dir is None and args.patch_size:
        optional["patch_size"] = args.patch_size
    optional = {k: v for k, v in optional.items() if k not in kwargs}
    model = create_with_optional(args.model, kwargs, optional, pretrained=args.pretrained)
    if args.initial_checkpoint:
        _load_initial_checkpoint(model, args.initial_checkpoint)
    pretrained = args.pretrained or bool(args.initial_checkpoint)
    if data is not None and data.needs_model_transforms:
        data.attach_transforms(model, args)

    if args.no_scheme:
        _logger.info("training %s as timm builds it (--no-scheme)", args.model)
        return model
    if is_patched(model):
        _logger.info("%s is already a SCHEME model (%s); the SCHEME options given are not applied",
                     args.model, model.scheme_config)
        return model
    options = dict(args.scheme)  # the SchemeConfig fields the command line gave
    by_steps = options.get("cca_anneal") == "steps" or ("cca_anneal_start" in options and "cca_anneal" not in options)
    if by_steps and options.get("cca_anneal_steps") is None and options.get("cca", True):
        # --cca-anneal steps / --cca-anneal-start F alone: over this run's optimizer steps
        options.update(cca_anneal="steps", cca_anneal_steps=total_updates)
    if options.get("init") == "dense":
        if not pretrained:
            _logger.warning("init=dense converts the model's current MLP weights, which are random without "
                            "--pretrained or --initial-checkpoint")
        if data is not None and args.calibration_images > 0:
            options["calibration_data"] = data.calibration_images(args.calibration_images)
    scheme_patch(model, **options)
    _logger.info("patched %d MLPs of %s with SCHEME (%s)", len(scheme_mixers(model)), args.model,
                 model.scheme_config)
    if hasattr(model, "scheme_init_report"):
        _logger.info("init=dense: %s", model.scheme_init_report.summary())
    return model


def _load_initial_checkpoint(model: nn.Module, path: str) -> None:
    """Dense weights from a checkpoint in any of timm's formats; tensors whose shape differs from the model's
    (a classifier of another class count) are left as built, and the log names them."""
    if not Path(path).is_file():
        raise SystemExit(f"--initial-checkpoint {path}: no such file")
    try:
        state, _ = read_training_checkpoint(path)
    except CheckpointFormatError as error:
        raise SystemExit(f"--initial-checkpoint: {error}") from error
    own = model.state_dict()
    reshaped = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in reshaped}, strict=False)
    if unexpected or set(missing) - set(reshaped):
        raise SystemExit(
            f"--initial-checkpoint {path} does not fit {type(model).__name__}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; give the --model and --model-kwargs it was trained with")
    if reshaped:
        _logger.info("--initial-checkpoint: kept the new model's %s (other shapes in the checkpoint)", reshaped)


def create_with_optional(name: str, kwargs: Dict[str, Any], optional: Dict[str, Any],
                         pretrained: bool = False) -> nn.Module:
    """``timm.create_model`` with as many of the ``optional`` arguments (in their order: img_size, then
    patch_size) as the architecture takes: all of them, else fewer from the end, else none."""
    items = list(optional.items())
    first_error: Optional[TypeError] = None
    for keep in range(len(items), -1, -1):
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs, **dict(items[:keep]))
        except TypeError as error:  # an argument this architecture does not take
            first_error = first_error or error
    raise first_error


def _has_cca(model: nn.Module) -> bool:
    return any(m.has_cca for m in scheme_mixers(model).values())


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def cca_state(model: nn.Module) -> Dict[str, Any]:
    """Per layer, the CCA weight in effect (1 - alpha after the annealing cap) and the learnt one (before it)."""
    effective, learnt = cca_weights(model), cca_weights(model, learnt=True)
    with torch.no_grad():
        caps = [float(m._anneal_factor()) for m in scheme_mixers(model).values() if m.has_cca]
    cap = caps[-1] if caps else None
    mean = sum(effective.values()) / len(effective) if effective else 0.0
    return dict(cca_limit=cap, cca_weight_mean=mean, cca_weights=effective, cca_weights_learnt=learnt)


# --- fuse, verify, export --------------------------------------------------------------------------------

def finish(model: nn.Module, data: Data, args: argparse.Namespace, history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Evaluate, fuse, check the fused model against the unfused eval output, export; the run's summary."""
    out = Path(args.output)
    model.eval()
    input_size = data.input_size
    verify_x = torch.cat([x for x, _ in _take(data.eval_loader(), 256)])[:256]
    summary: Dict[str, Any] = dict(
        model=args.model, epochs=len(history), seed=args.seed, num_classes=data.num_classes,
        input_size=list(input_size), train_images=len(data.train), eval_images=len(data.eval_set),
        scheme_config=_config_dict(model), history_file="log.json")
    summary["top1"] = history[-1]["top1"] if history else evaluate(model, data.eval_loader())[1]
    summary["params"] = count_params(model)
    summary["macs"] = count_macs(model, input_size)

    mixers = scheme_mixers(model)
    if not any(m.has_cca for m in mixers.values()):
        summary.update(fused=False, top1_fused=summary["top1"], params_fused=summary["params"],
                       macs_fused=summary["macs"], cca_weight_final=0.0, cca_weights_final={})
        if mixers:  # BD-MLP without CCA: fusing is a no-op, still run it so the export is the inference form
            fuse_for_inference(model)
            summary["fused"] = True
        _export(model, data, out, args)
        return summary

    state = cca_state(model)
    summary["cca_weights_final"] = state["cca_weights"]
    summary["cca_weights_learnt_final"] = state["cca_weights_learnt"]
    summary["cca_weight_final"] = state["cca_weight_mean"]
    with cca_in_eval(model):  # the function that was trained: BD-MLP + CCA, without dropout
        summary["top1_with_cca"] = evaluate(model, data.eval_loader())[1]
    summary["macs_with_cca"] = count_macs(model, input_size, with_cca=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # said below, with the accuracy it costs
        try:
            fuse_for_inference(model, verify_x)
        except FuseVerificationError:
            pass  # the report says it, and the run ends with FAIL
    report = model.scheme_fuse_report
    max_rel = report.eval_difference
    summary.update(
        fused=True, top1_fused=evaluate(model, data.eval_loader())[1], params_fused=count_params(model),
        macs_fused=count_macs(model, input_size), fuse_max_relative_difference=max_rel,
        fuse_relative_change_vs_training_function=report.relative_output_change,
        fuse_layers_above_threshold=report.above_threshold, cca_tensors_left=report.leftover_tensors,
        verified=report.verified)
    _logger.info("fused: top-1 %.2f%% (unfused eval %.2f%%, with CCA %.2f%%); max relative difference to the "
                 "unfused eval output %.2e: %s", summary["top1_fused"], summary["top1"], summary["top1_with_cca"],
                 max_rel, "PASS" if summary["verified"] else "FAIL")
    if report.above_threshold:
        _logger.warning(
            "fusing discarded a CCA weight above %g in %d layer(s) (mean 1 - alpha %.3f): the deployed model scores "
            "%.2f%% against %.2f%% for the function that was trained. Anneal CCA to make fusing lossless: a "
            "decaying --sched (the default CCA schedule follows the learning rate) or --cca-anneal-start 0.5", report.threshold, len(report.above_threshold), summary["cca_weight_final"],
            summary["top1_fused"], summary["top1_with_cca"])
    _export(model, data, out, args)
    return summary


def _export(model: nn.Module, data: Data, out: Path, args: argparse.Namespace) -> None:
    """The fused model as a timm checkpoint folder (config.json + model.safetensors + README.md)."""
    if args.no_export:
        return
    export = out / "export"
    if getattr(model, "scheme_config", None) is not None:
        save_pretrained(model, export, overwrite=True, data_config=data.data_config)
    else:  # --no-scheme: a plain timm model, saved the way timm saves one
        from timm.models import save_for_hf
        export.mkdir(parents=True, exist_ok=True)
        save_for_hf(model, str(export), data_config=data.data_config)
    _logger.info("exported to %s; load it with timm.create_model('local-dir:%s', pretrained=True)", export, export)


def _config_dict(model: nn.Module) -> Optional[Dict[str, Any]]:
    config = getattr(model, "scheme_config", None)
    return config.to_dict() if isinstance(config, SchemeConfig) else None


def _jsonable(values: Dict[str, Any]) -> Dict[str, Any]:
    kept = {}
    for key, value in values.items():
        try:
            json.dumps(value)
            kept[key] = value
        except (TypeError, ValueError):
            pass
    return kept


def _take(loader: Iterable, n: int) -> Iterable:
    seen = 0
    for batch in loader:
        yield batch
        seen += len(batch[1])
        if seen >= n:
            return


# --- logs, checkpoints -----------------------------------------------------------------------------------

def _recorded_args(args: argparse.Namespace, model: nn.Module) -> Dict[str, Any]:
    """The command line as run, with the create_model arguments it resolved to (what `timm-scheme export`
    reads back to rebuild the model from a checkpoint)."""
    recorded = _jsonable(vars(args))
    built = _jsonable(getattr(model, "_model_args", {}))
    for key in ("num_classes", "in_chans", "img_size"):
        if key in built:
            recorded[key] = built.pop(key)
    recorded["model_kwargs"] = built
    recorded["scheme_config"] = _config_dict(model)  # what `timm-scheme export` rebuilds the model with
    return recorded


def _write_logs(out: Path, args: Dict[str, Any], history: List[Dict[str, Any]]) -> None:
    (out / "log.json").write_text(json.dumps(dict(args=args, epochs=history), indent=2))
    layers = list(history[-1]["cca_weights"])
    fields = ["epoch", "lr", "train_loss", "eval_loss", "top1", "cca_limit", "cca_weight_mean", "time_s"]
    with open(out / "log.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields + [f"1-alpha:{name}" for name in layers])
        for row in history:
            writer.writerow([row[k] for k in fields] + [row["cca_weights"].get(name) for name in layers])


def _save_checkpoint(path: Path, model, optimizer, scheduler, epoch: int, history, args: Dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(dict(epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(), history=history, args=args), tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def _load_checkpoint(path: str, model, optimizer, scheduler,
                     world_size: int = 1) -> Tuple[int, List[Dict[str, Any]]]:
    if not Path(path).is_file():
        raise SystemExit(f"--resume {path}: no such checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=True)  # no pickle of arbitrary objects
    saved_world_size = state.get("args", {}).get("world_size", 1)
    if saved_world_size != world_size:  # --batch-size is per process: the schedule's step count would change
        raise SystemExit(
            f"--resume {path}: written by a run of {saved_world_size} process(es), this one has {world_size}; "
            f"resume with {saved_world_size} (torchrun --nproc_per_node {saved_world_size}, or no torchrun for 1)")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), list(state.get("history", []))
