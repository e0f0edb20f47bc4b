"""The data of a training run: scikit-learn's digits held in memory, or a timm image folder, as loaders that
shard over the ranks of a torchrun launch."""
from __future__ import annotations

import argparse
import copy
from typing import Any, Dict, Optional, Tuple

import torch
from timm.data import Mixup, create_dataset, create_transform, resolve_model_data_config
from timm.data.random_erasing import RandomErasing
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from .digits import load_digits_tensors
from .distributed import Processes


class Data:
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


def load_data(args: argparse.Namespace, processes: Optional[Processes] = None) -> Data:
    if args.data_dir is None:
        img_size = args.img_size or 16
        x_train, y_train, x_test, y_test = load_digits_tensors(img_size, in_chans=3, seed=args.split_seed)
        erase = RandomErasing(args.reprob, mode="pixel", device="cpu") if args.reprob > 0 else None
        data = Data(TensorDataset(x_train, y_train), TensorDataset(x_test, y_test), 10, (3, img_size, img_size),
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
    return Data(train, eval_set, num_classes, input_size, args.batch_size, workers=args.workers,
                 needs_model_transforms=True, seed=args.seed, processes=processes)


def mixup_from(args: argparse.Namespace, num_classes: int) -> Optional[Mixup]:
    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                 label_smoothing=args.smoothing, num_classes=num_classes)
