"""LightningDataModule over discovered samples: loaders, reproducible shuffling, and bad-image bookkeeping.

Unreadable images are skipped rather than fatal, up to data.max_bad_images; each one is listed in the run
dir's log so the user can repair the data set, and one too many stops the run with the full list.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

from transfer_cli.data.gpu_decode import DeviceDecoder, EncodedBatch, EncodedImageDataset, collate_encoded
from transfer_cli.data.images import BadImage, ImageDataset, format_bad, scan_images
from transfer_cli.data.samplers import train_sampler
from transfer_cli.data.sources import SPLITS, DataSplits, Sample
from transfer_cli.data.transforms import build_transform
from transfer_cli.errors import TransferError
from transfer_cli.lifecycle.determinism import EpochIndexSampler, EpochSeededDataset, place_sampler


class Batch(NamedTuple):
    """What the loaders yield: a NamedTuple, so pin_memory and worker pickling keep its type."""

    images: torch.Tensor  # (N, 3, H, W) float32, N may be 0 when every image of the batch failed
    labels: torch.Tensor  # (N,) int64 class indices; task=multilabel: (N, C) float32 multi-hot targets
    bad: List[Tuple[str, str]]  # (path, reason) of the samples dropped from this batch


def multi_hot(label_sets: Sequence[Sequence[int]], num_labels: int) -> torch.Tensor:
    """(N, num_labels) float32 targets, 1.0 at each sample's label indices (a row of zeros for an empty set)."""
    target = torch.zeros((len(label_sets), num_labels), dtype=torch.float32)
    for row, indices in enumerate(label_sets):
        target[row, list(indices)] = 1.0
    return target


def collate_drop_bad(
    items: Sequence[Any], image_shape: Tuple[int, int, int], num_labels: Optional[int] = None
) -> Batch:
    """`num_labels`: None when each sample has one class index; the class count when samples carry label sets."""
    good = [it for it in items if not isinstance(it, BadImage)]
    bad = [(it.path, it.reason) for it in items if isinstance(it, BadImage)]
    if good:
        images = torch.stack([img for img, _ in good])
        label_list = [label for _, label in good]
        if num_labels is None:
            labels = torch.tensor(label_list, dtype=torch.long)
        else:
            labels = multi_hot(label_list, num_labels)
    else:  # keep the shapes a model expects, so a step can check for N == 0 instead of crashing
        images = torch.empty((0, *image_shape), dtype=torch.float32)
        if num_labels is None:
            labels = torch.empty((0,), dtype=torch.long)
        else:
            labels = torch.empty((0, num_labels), dtype=torch.float32)
    return Batch(images, labels, bad)


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends on (seed, epoch) only: resuming at epoch k replays epoch k's order, and
    nothing else that consumes random numbers (model init, augmentation) can shift it."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every training epoch
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        # SeedSequence mixes both numbers, so neighbouring (seed, epoch) pairs give unrelated orders.
        rng = np.random.default_rng([self.seed % 2**64, self.epoch])
        return iter(rng.permutation(self.num_samples).tolist())

    def __len__(self) -> int:
        return self.num_samples


def resolve_num_workers(value: Any) -> int:
    """data.num_workers: a count, or "auto". Auto leaves one core to the training process, which on a small
    machine does the heavy lifting itself; more than 8 decoders rarely pay off for a single device."""
    if str(value) == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(0, min(8, cores - 1))
    try:
        workers = int(value)
    except (TypeError, ValueError):
        workers = -1
    if workers < 0:
        raise TransferError(f"data.num_workers={value} is not a worker count", "use data.num_workers=auto or 0, 1, 2, ...")
    return workers


class ImageDataModule(pl.LightningDataModule):
    def __init__(
        self,
        splits: DataSplits,
        data_config: Dict[str, Any],
        data_cfg: Any,
        aug_cfg: Any,
        seed: int,
        bad_image_log: Optional[Path] = None,
    ):
        super().__init__()
        self.splits = splits
        self.data_config = dict(data_config)
        self.data_cfg = data_cfg
        self.aug_cfg = aug_cfg
        self.seed = int(seed)
        self.bad_image_log = Path(bad_image_log) if bad_image_log is not None else None
        self.max_bad_images = int(data_cfg.max_bad_images)
        self.batch_size = int(data_cfg.batch_size)
        self.eval_batch_size = int(data_cfg.eval_batch_size or 2 * self.batch_size)
        self.num_workers = resolve_num_workers(data_cfg.num_workers)
        self.image_shape = tuple(int(v) for v in self.data_config["input_size"])
        self._transforms = {aug: build_transform(self.data_config, aug_cfg, train=aug) for aug in (True, False)}
        self._bad: Dict[str, str] = {}  # path -> reason; a dict, so it is a set that keeps first-seen order
        self._samples: Optional[Dict[str, List[Sample]]] = None
        self.device_decoder: Optional[DeviceDecoder] = None  # data.decode=gpu, switched on by decode_on()

    # ------------------------------------------------------------ metadata

    @property
    def class_names(self) -> List[str]:
        return list(self.splits.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.splits.class_names)

    @property
    def class_to_idx(self) -> Dict[str, int]:
        return {c: i for i, c in enumerate(self.splits.class_names)}

    @property
    def bad_images(self) -> List[Tuple[str, str]]:
        return list(self._bad.items())

    def samples(self, split: str) -> List[Sample]:
        """The split's samples after setup()'s scan, in loader order (unshuffled)."""
        self.setup()
        assert self._samples is not None
        if split not in self._samples:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self._samples[split]

    # ------------------------------------------------------------ bad images

    def record_bad(self, bad: Sequence[Tuple[str, str]]) -> None:
        """Remember newly failed images, append them to the log, and stop once there are too many."""
        new = [(str(p), str(r)) for p, r in bad if str(p) not in self._bad]
        if new:
            self._bad.update(new)
            if self.bad_image_log is not None:
                self.bad_image_log.parent.mkdir(parents=True, exist_ok=True)
                with open(self.bad_image_log, "a", encoding="utf-8") as f:
                    f.writelines(f"{p}\t{r}\n" for p, r in new)
        if len(self._bad) > self.max_bad_images:
            where = f" (listed in {self.bad_image_log})" if self.bad_image_log is not None else ""
            raise TransferError(
                f"{len(self._bad)} unreadable image(s){where}, more than "
                f"data.max_bad_images={self.max_bad_images}:\n{format_bad(self.bad_images)}",
                f"remove or repair those files, or allow more: data.max_bad_images={len(self._bad)}",
            )

    def decode_on(self, device: Any) -> None:
        """data.decode=gpu: from now on the workers only read the files, and `device` decodes and transforms."""
        self.device_decoder = DeviceDecoder(self._transforms, self.image_shape, device)

    def strip_bad(self, batch: Any, device: Any = None) -> Any:
        """(images, labels) of a loader batch, recording the images it dropped. Code that iterates a loader
        itself (outside a Trainer that has this data module) calls this on each batch. With data.decode=gpu
        the images are decoded here, on `device` (default: the one given to decode_on)."""
        if isinstance(batch, EncodedBatch) and self.device_decoder is not None:
            images, labels, bad = self.device_decoder.decode(batch, device)
            self.record_bad(bad)
            return images, labels
        if not isinstance(batch, Batch):
            return batch
        if batch.bad:
            self.record_bad([tuple(b) for b in batch.bad])  # pin_memory turns the inner tuples into lists
        return batch.images, batch.labels

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Runs in the main process, where the set of bad images and the log live; workers cannot share them.
        return self.strip_bad(batch, self.trainer.strategy.root_device if self.trainer is not None else None)

    # ------------------------------------------------------------ setup and loaders

    def setup(self, stage: Optional[str] = None) -> None:
        if self._samples is not None:  # Lightning calls setup once per stage; the scan is needed only once
            return
        every = [s for split in SPLITS for s in getattr(self.splits, split)]
        # Budget = everything here, so all bad files get logged; record_bad then enforces the real budget.
        bad = scan_images(every, budget=len(every))
        self.record_bad(bad)
        dropped = {p for p, _ in bad}
        self._samples = {split: [s for s in getattr(self.splits, split) if s[0] not in dropped] for split in SPLITS}
        for split in ("train", "val"):
            if getattr(self.splits, split) and not self._samples[split]:  # an empty val: data.val_fraction=0
                raise TransferError(
                    f"every image of the {split} split is unreadable:\n{format_bad(bad)}",
                    "remove or repair those files",
                )

    def loader(self, split: str, augment: bool, shuffle: bool = False) -> DataLoader:
        """A DataLoader over one split; e.g. loader("train", augment=False) gives the training images with eval
        preprocessing, in a fixed order, for precomputing frozen-backbone features."""
        samples = self.samples(split)
        if not samples:
            raise TransferError(
                f"the data set has no {split} split",
                "add a test/ folder (or split=test rows), or set data.test_fraction=0.1",
            )
        if self.device_decoder is not None:  # data.decode=gpu: file bytes, decoded in strip_bad
            dataset: Any = EncodedImageDataset(samples)
            collate = partial(collate_encoded, augment=bool(augment), collate_labels=partial(
                multi_hot, num_labels=self.num_classes) if self.splits.multilabel else None)
        else:
            dataset = ImageDataset(samples, self._transforms[bool(augment)])
            collate = partial(collate_drop_bad, image_shape=self.image_shape,
                              num_labels=self.num_classes if self.splits.multilabel else None)
        sampler = train_sampler(getattr(self.data_cfg, "sampler", "shuffle"), [s[1] for s in samples], self.seed) \
            if shuffle else None  # data.sampler: a (seed, epoch) shuffle, or class-balanced draws
        if sampler is not None and self.device_decoder is None:
            # Augmentation seeded by (seed, epoch, image) and a sampler that can skip the batches an interrupted
            # epoch already trained on: a resumed run sees exactly the images an uninterrupted one would.
            dataset, sampler = EpochSeededDataset(dataset, self.seed), EpochIndexSampler(sampler)
        workers = self.num_workers
        batch_size = self.batch_size if augment else self.eval_batch_size  # no gradients kept when evaluating
        # A last training batch of one image breaks BatchNorm in train mode ("expected more than 1 value per
        # channel"): drop just that one, never a larger remainder.
        drop_last = bool(shuffle) and batch_size > 1 and len(samples) % batch_size == 1
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=drop_last,
            num_workers=workers,
            persistent_workers=workers > 0,
            # Encoded batches stay in pageable memory: nvJPEG copies the compressed bytes itself.
            pin_memory=torch.cuda.is_available() and self.device_decoder is None,
            collate_fn=collate,
            # Worker base seeds (hence the random crops and flips) follow `seed`, independent of the sampler.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        loader = self.loader("train", augment=True, shuffle=True)
        place_sampler(loader.sampler, self.trainer, len(loader), self.batch_size)  # epoch and mid-epoch resume
        return loader

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", augment=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", augment=False)

    def predict_dataloader(self) -> DataLoader:
        return self.loader("test" if self.splits.test else "val", augment=False)


__all__ = ["ImageDataModule", "EpochShuffleSampler", "Batch", "collate_drop_bad"]
