"""Train any timm model with SCHEME mixers, using timm's own factories, then fuse, verify and export.

    timm-scheme train                                  # ViT-Tiny on scikit-learn's digits, SCHEME g=4, E=8
    timm-scheme train --model schemeformer_ppaa_s12_224 --data-dir /data/imagenette --epochs 100
    timm-scheme train --cca-anneal-start 0.5           # drive 1 - alpha to zero over the second half
    torchrun --standalone --nproc_per_node 2 -m timm_scheme.cli train   # DDP, one replica per process

Writes to ``--output``: ``log.csv`` and ``log.json`` (per epoch: top-1, loss, lr, per-layer 1 - alpha),
``checkpoint.pth`` (resumable with ``--resume``), ``summary.json`` and ``export/`` (the fused model).
Under torchrun every process trains a DistributedDataParallel replica on its shard of the data; rank 0
alone writes.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset
from timm.data import Mixup, create_dataset, create_transform, resolve_model_data_config
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ParseKwargs
from tqdm.auto import tqdm

from .config import SchemeConfig
from .data import load_digits_tensors
from .distributed import Processes, check_ranks_agree, end_processes, replicate, start_processes
from .fuse import (cca_anneal_limit, cca_in_eval, cca_weights, fuse_for_inference, max_relative_difference,
                   scheme_mixers, set_cca_limit)
from .io import CheckpointFormatError, read_training_checkpoint, save_pretrained
from .patch import is_patched, scheme_patch
from .stats import count_macs, count_params

_logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pth"
VERIFY_TOLERANCE = 1e-5  # max |fused - unfused| / max |unfused| over the verification batch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="vit_tiny_patch16_224", help="any timm model name")
    model.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                       help="passed to timm.create_model, e.g. embed_dim=96 depth=6 mlp_ratio=8")
    model.add_argument("--img-size", type=int, default=None,
                       help="input size (default: 16 on digits, the model's own on an image folder)")
    model.add_argument("--patch-size", type=int, default=4,
                       help="on digits, passed to models that take it (ViT-style patch embedding)")
    model.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    model.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights")
    model.add_argument("--initial-checkpoint", default=None, metavar="PATH",
                       help="start from these weights of the model (timm's checkpoint formats; a classifier of "
                            "another class count is left as built)")

    scheme = parser.add_argument_group("SCHEME")
    scheme.add_argument("--groups", type=int, default=4, help="block-diagonal groups")
    scheme.add_argument("--expansion", type=float, default=8.0, help="hidden units per input channel (E)")
    scheme.add_argument("--no-cca", action="store_true", help="BD-MLP alone, without the CCA branch")
    scheme.add_argument("--no-scheme", action="store_true", help="train the model as timm builds it (baseline)")
    scheme.add_argument("--scheme-options", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                        help="other SchemeConfig fields, e.g. cca_scale_mode=normalized alpha_init=0.7")
    scheme.add_argument("--calibration-images", type=int, default=256, metavar="N",
                        help="with --scheme-options init=dense: training images (without augmentation) on which "
                             "the conversion fits each layer; 0 converts from the weights alone")
    scheme.add_argument("--cca-anneal-start", type=float, default=None, metavar="FRACTION",
                        help="anneal CCA (cap every layer's 1 - alpha, cosine from 1x to 0x) from this fraction "
                             "of training to the end, so that fusing discards nothing; 0 anneals throughout")

    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default=None,
                      help="image folder with train/ and validation/ (or val/) class subfolders; "
                           "default: scikit-learn's bundled digits")
    data.add_argument("--train-split", default="train")
    data.add_argument("--val-split", default="validation")
    data.add_argument("--split-seed", type=int, default=0, help="digits: seed of the fixed train/test split")
    data.add_argument("--workers", type=int, default=0, help="data loader processes (image folder)")
    data.add_argument("--aa", default=None, help="image folder: timm auto-augment policy, e.g. rand-m9-mstd0.5")
    data.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    data.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    data.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off)")
    data.add_argument("--mixup-prob", type=float, default=1.0)
    data.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=10)
    optim.add_argument("--batch-size", type=int, default=64,
                       help="per process: under torchrun the global batch is this times the process count")
    optim.add_argument("--opt", default="adamw", help="timm optimizer name")
    optim.add_argument("--lr", type=float, default=2e-3)
    optim.add_argument("--weight-decay", type=float, default=0.05)
    optim.add_argument("--sched", default="cosine", help="timm scheduler name")
    optim.add_argument("--warmup-epochs", type=int, default=1)
    optim.add_argument("--min-lr", type=float, default=1e-5)
    optim.add_argument("--clip-grad", type=float, default=None)

    run_group = parser.add_argument_group("run")
    run_group.add_argument("--output", default="output/train", help="folder for logs, checkpoint and export")
    run_group.add_argument("--resume", default=None, metavar="CHECKPOINT",
                           help="continue from a checkpoint.pth written by an earlier run")
    run_group.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                           help="stop once this epoch is done, keeping the schedule of --epochs "
                                "(for time-limited jobs: continue later with --resume)")
    run_group.add_argument("--seed", type=int, default=0)
    run_group.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run_group.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    run_group.add_argument("--no-export", action="store_true", help="skip writing export/")


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
    if args.cca_anneal_start is not None and not 0.0 <= args.cca_anneal_start < 1.0:
        raise SystemExit(f"--cca-anneal-start={args.cca_anneal_start}: expected a fraction in [0, 1)")
    out = Path(args.output)
    if processes.is_main:
        out.mkdir(parents=True, exist_ok=True)
    else:
        logging.getLogger("timm_scheme").setLevel(logging.WARNING)  # rank 0 tells the story once
    _seed_everything(args.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)

    data = _load_data(args, processes)
    model = build_model(args, data.num_classes, data.input_size, data)
    recorded_args = _recorded_args(args, model)
    recorded_args["world_size"] = processes.world_size
    model.to(processes.device)
    mixers = scheme_mixers(model)
    annealing = args.cca_anneal_start is not None and any(m.has_cca for m in mixers.values())

    optimizer = create_optimizer_v2(model, args.opt, lr=args.lr, weight_decay=args.weight_decay)
    updates_per_epoch = len(data.train_loader(0))
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    mixup = _mixup(args, data.num_classes)
    train_loss_fn = SoftTargetCrossEntropy() if mixup is not None else (
        LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss())

    history: List[Dict[str, Any]] = []
    start_epoch = 0
    if args.resume:
        start_epoch, history = _load_checkpoint(args.resume, model, optimizer, scheduler, processes.world_size)
        _logger.info("resumed from %s at epoch %d", args.resume, start_epoch)
    replica = replicate(model, processes)

    total_updates = args.epochs * updates_per_epoch
    for epoch in range(start_epoch, args.epochs):
        # a resumed run repeats the uninterrupted one; ranks draw different augmentations and dropout
        _seed_everything(processes.rank_seed(args.seed * 10_000 + epoch))
        started = time.perf_counter()
        train_loss = _train_one_epoch(
            replica, data.train_loader(epoch), optimizer, scheduler, train_loss_fn, mixup,
            data.batch_augment, epoch=epoch, updates_per_epoch=updates_per_epoch, total_updates=total_updates,
            anneal_start=args.cca_anneal_start if annealing else None, clip_grad=args.clip_grad,
            progress=not args.no_progress and processes.is_main, desc=f"epoch {epoch + 1}/{args.epochs}",
            device=processes.device)
        train_loss = processes.mean(train_loss)
        # the unwrapped model: evaluation needs no gradient sync, and the ranks' shards may differ in batches
        eval_loss, top1 = evaluate(model, data.eval_loader(shard=processes.distributed),
                                   across_processes=processes.distributed)
        check_ranks_agree(model, processes)
        record = dict(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"], train_loss=train_loss,
                      eval_loss=eval_loss, top1=top1, time_s=time.perf_counter() - started, **cca_state(model))
        history.append(record)
        if processes.is_main:
            _write_logs(out, recorded_args, history)
            _save_checkpoint(out / CHECKPOINT, model, optimizer, scheduler, epoch + 1, history, recorded_args)
        _logger.info("epoch %d/%d  train loss %.4f  eval loss %.4f  top-1 %.2f%%  mean 1-alpha %.4f  %.1fs",
                     epoch + 1, args.epochs, train_loss, eval_loss, top1, record["cca_weight_mean"],
                     record["time_s"])
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


# ---------------------------------------------------------------------------------------------- model

def build_model(args: argparse.Namespace, num_classes: int, input_size: Optional[Tuple[int, int, int]],
                data: Optional["_Data"] = None) -> nn.Module:
    """``timm.create_model`` for the data at hand (with its transforms attached to ``data``), then
    ``scheme_patch`` unless the model already is SCHEME; ``init=dense`` converts on ``data``'s images."""
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
        _logger.info("%s is already a SCHEME model (%s); --groups/--expansion/--scheme-options not applied",
                     args.model, model.scheme_config)
        return model
    options = dict(args.scheme_options)
    if args.no_cca:
        options["cca"] = False
    if options.get("init") == "dense":
        if not pretrained:
            _logger.warning("init=dense converts the model's current MLP weights, which are random without "
                            "--pretrained or --initial-checkpoint")
        if data is not None and args.calibration_images > 0:
            options["calibration_data"] = data.calibration_images(args.calibration_images)
    scheme_patch(model, groups=args.groups, expansion=args.expansion, **options)
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
    # img_size / patch_size exist on some architectures only: drop the ones a model rejects
    optional = dict(optional)
    while True:
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs, **optional)
        except TypeError as err:
            rejected = [k for k in optional if k in str(err)]
            if not rejected:
                raise
            for key in rejected:
                optional.pop(key)


def cca_state(model: nn.Module) -> Dict[str, Any]:
    """Per layer, the CCA weight in effect (1 - alpha after annealing) and the learnt one (before it)."""
    effective, learnt = cca_weights(model), cca_weights(model, learnt=True)
    limits = [float(m.cca_limit) for m in scheme_mixers(model).values() if m.has_cca]
    limit = limits[-1] if limits else None
    mean = sum(effective.values()) / len(effective) if effective else 0.0
    return dict(cca_limit=limit, cca_weight_mean=mean, cca_weights=effective, cca_weights_learnt=learnt)


# ----------------------------------------------------------------------------------------------- data

class _Data:
    """Loaders for one run: scikit-learn's digits held in memory, or a timm image folder."""

    def __init__(self, train: Dataset, eval_set: Dataset, num_classes: int, input_size: Tuple[int, int, int],
                 batch_size: int, workers: int = 0, batch_augment=None, needs_model_transforms: bool = False,
                 seed: int = 0, processes: Optional[Processes] = None):
        self.train, self.eval_set = train, eval_set
        self.num_classes, self.input_size = num_classes, input_size
        self.batch_size, self.workers = batch_size, workers
        self.seed = seed
        self.processes = processes or Processes()
        self.batch_augment = batch_augment
        self.needs_model_transforms = needs_model_transforms
        self.data_config: Optional[Dict[str, Any]] = None  # the preprocessing an export records

    def train_loader(self, epoch: int) -> DataLoader:
        """This epoch's shuffled batches: all of them alone, this rank's share under torchrun."""
        if not self.processes.distributed:
            # drop_last keeps batches even (mixup needs it) and the step count fixed
            drop_last = len(self.train) >= 2 * self.batch_size
            return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=drop_last,
                              num_workers=self.workers,
                              generator=torch.Generator().manual_seed(self.seed * 10_000 + epoch))
        # every rank shuffles alike and takes its own equal share (padded by repeats), so all ranks make the
        # same number of steps, which DDP needs; set_epoch reshuffles each epoch, reproducibly on --resume
        sampler = DistributedSampler(self.train, num_replicas=self.processes.world_size,
                                     rank=self.processes.rank, shuffle=True, seed=self.seed)
        sampler.set_epoch(epoch)
        return DataLoader(self.train, batch_size=self.batch_size, sampler=sampler,
                          drop_last=len(sampler) >= 2 * self.batch_size, num_workers=self.workers)

    def eval_loader(self, shard: bool = False) -> DataLoader:
        """The evaluation images; with `shard`, this rank's every world_size-th one (no repeats: the ranks'
        sums add up to the exact totals)."""
        images = self.eval_set
        if shard:
            images = Subset(images, range(self.processes.rank, len(images), self.processes.world_size))
        return DataLoader(images, batch_size=max(self.batch_size, 256), shuffle=False, num_workers=self.workers)

    def calibration_images(self, count: int) -> torch.Tensor:
        """The first ``count`` training images as evaluation sees them (no augmentation), one tensor."""
        images = Subset(self.eval_transformed_train(), range(min(count, len(self.train))))
        return torch.cat([x for x, _ in DataLoader(images, batch_size=max(self.batch_size, 64))])

    def eval_transformed_train(self) -> Dataset:
        if isinstance(self.train, TensorDataset):
            return self.train
        calibration = copy.copy(self.train)  # the same files, read with the evaluation transform
        calibration.transform = self.eval_set.transform
        return calibration

    def attach_transforms(self, model: nn.Module, args: argparse.Namespace) -> None:
        config = resolve_model_data_config(model, args=dict(input_size=self.input_size) if self.input_size else None)
        self.input_size = tuple(config["input_size"])
        self.data_config = dict(config)
        self.train.transform = create_transform(
            **config, is_training=True, auto_augment=args.aa, re_prob=args.reprob)
        self.eval_set.transform = create_transform(**config)


def _load_data(args: argparse.Namespace, processes: Optional[Processes] = None) -> _Data:
    if args.data_dir is None:
        img_size = args.img_size or 16
        x_train, y_train, x_test, y_test = load_digits_tensors(img_size, in_chans=3, seed=args.split_seed)
        erase = RandomErasing(args.reprob, mode="pixel", device="cpu") if args.reprob > 0 else None
        data = _Data(TensorDataset(x_train, y_train), TensorDataset(x_test, y_test), 10, (3, img_size, img_size),
                     args.batch_size, batch_augment=erase, seed=args.seed, processes=processes)
        # load_digits_tensors: 8x8 images in [0, 1], bilinear resize, normalised with mean = std = 0.5
        data.data_config = dict(input_size=(3, img_size, img_size), mean=(0.5,) * 3, std=(0.5,) * 3,
                                interpolation="bilinear", crop_pct=1.0)
        return data
    train = create_dataset("", root=args.data_dir, split=args.train_split, is_training=True)
    eval_set = create_dataset("", root=args.data_dir, split=args.val_split)
    num_classes = len(getattr(train.reader, "class_to_idx", None) or {})
    if not num_classes:
        raise SystemExit(f"--data-dir {args.data_dir}: found no class subfolders in its '{args.train_split}' split")
    # without --img-size, the input size is the model's own, known once it is built (attach_transforms)
    input_size = (3, args.img_size, args.img_size) if args.img_size else None
    return _Data(train, eval_set, num_classes, input_size, args.batch_size, workers=args.workers,
                 needs_model_transforms=True, seed=args.seed, processes=processes)


def _mixup(args: argparse.Namespace, num_classes: int) -> Optional[Mixup]:
    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                 label_smoothing=args.smoothing, num_classes=num_classes)


# ------------------------------------------------------------------------------------------- training

def _train_one_epoch(model, loader: Iterable, optimizer, scheduler, loss_fn, mixup, batch_augment, *, epoch: int,
                     updates_per_epoch: int, total_updates: int, anneal_start: Optional[float],
                     clip_grad: Optional[float], progress: bool, desc: str,
                     device: torch.device = torch.device("cpu")) -> float:
    model.train()
    losses = []
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        update = epoch * updates_per_epoch + i
        if anneal_start is not None:
            set_cca_limit(model, cca_anneal_limit(update / total_updates, anneal_start))
        if batch_augment is not None:
            x = batch_augment(x)
        if mixup is not None:
            x, y = mixup(x, y)
        x, y = x.to(device), y.to(device)  # augmented where the data lives (RandomErasing is set up on CPU)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        scheduler.step_update(num_updates=update + 1)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if anneal_start is not None and epoch * updates_per_epoch + len(losses) >= total_updates:
        set_cca_limit(model, 0.0)  # the schedule's end point: nothing left for fusing to discard
    return float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, across_processes: bool = False) -> Tuple[float, float]:
    """(cross-entropy, top-1 %) of the model in eval mode, on the device of its parameters.
    ``across_processes``: the loader holds this rank's shard; the totals are summed over all ranks."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, correct, loss_sum = 0, 0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        total += len(y)
    model.train(was_training)
    if across_processes:
        sums = torch.tensor([loss_sum, correct, total], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        loss_sum, correct, total = float(sums[0]), int(sums[1]), int(sums[2])
    return loss_sum / max(total, 1), 100.0 * correct / max(total, 1)


# --------------------------------------------------------------------------------- fuse, verify, export

def finish(model: nn.Module, data: _Data, args: argparse.Namespace, history: List[Dict[str, Any]]) -> Dict[str, Any]:
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
        summary["macs_with_cca"] = count_macs(model, input_size)

    with torch.no_grad():
        unfused = model(verify_x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # said below, with the accuracy it costs
        fuse_for_inference(model, verify_x[:64])
    report = model.scheme_fuse_report
    with torch.no_grad():
        fused = model(verify_x)
    max_rel = max_relative_difference(unfused, fused)
    leftover = [k for k in model.state_dict() if "mix_logits" in k or "cca" in k]
    summary.update(
        fused=True, top1_fused=evaluate(model, data.eval_loader())[1], params_fused=count_params(model),
        macs_fused=count_macs(model, input_size), fuse_max_relative_difference=max_rel,
        fuse_relative_change_vs_training_function=report.relative_output_change,
        fuse_layers_above_threshold=report.above_threshold, cca_tensors_left=leftover,
        verified=max_rel <= VERIFY_TOLERANCE and not leftover)
    _logger.info("fused: top-1 %.2f%% (unfused eval %.2f%%, with CCA %.2f%%); max relative difference to the "
                 "unfused eval output %.2e: %s", summary["top1_fused"], summary["top1"], summary["top1_with_cca"],
                 max_rel, "PASS" if summary["verified"] else "FAIL")
    if report.above_threshold:
        _logger.warning(
            "fusing discarded a CCA weight above %g in %d layer(s) (mean 1 - alpha %.3f): the deployed model scores "
            "%.2f%% against %.2f%% for the function that was trained. Anneal CCA to make fusing lossless: "
            "--cca-anneal-start 0.5", report.threshold, len(report.above_threshold), summary["cca_weight_final"],
            summary["top1_fused"], summary["top1_with_cca"])
    _export(model, data, out, args)
    return summary


def _export(model: nn.Module, data: _Data, out: Path, args: argparse.Namespace) -> None:
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


# ---------------------------------------------------------------------------------- logs, checkpoints

def _recorded_args(args: argparse.Namespace, model: nn.Module) -> Dict[str, Any]:
    """The command line as run, with the create_model arguments it resolved to (what `timm-scheme export`
    reads back to rebuild the model from a checkpoint)."""
    recorded = _jsonable(vars(args))
    built = _jsonable(getattr(model, "_model_args", {}))
    for key in ("num_classes", "in_chans", "img_size"):
        if key in built:
            recorded[key] = built.pop(key)
    recorded["model_kwargs"] = built
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
