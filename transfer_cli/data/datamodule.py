"""LightningDataModule over discovered samples: loaders, reproducible shuffling, and bad-image bookkeeping.

It is given everything it needs, built elsewhere (transfer_cli/assembly/data.py): the splits, the two
transform pipelines, how to load (batch sizes, workers, sampler, seed), where decoding happens, and the budget
of unreadable images. Unreadable images are skipped rather than fatal, up to that budget (data/images.py).
"""

from __future__ import annotations

from functools import partial
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from transfer_cli import seeding
from transfer_cli.data.gpu_decode import DeviceDecoder, EncodedBatch, collate_encoded
from transfer_cli.data.images import BadImages, ImageDataset, scan_images
from transfer_cli.data.loaders import LoaderSettings, make_loader
from transfer_cli.data.samplers import ResumableSampler, ResumeStart, train_sampler
from transfer_cli.data.seeded import SeededItems
from transfer_cli.data.splits import SPLITS, DataSplits, Sample
from transfer_cli.data.transforms import Transforms
from transfer_cli.errors import TransferError


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
    from transfer_cli.data.images import BadImage

    good = [it for it in items if not isinstance(it, BadImage)]
    bad = [(it.path, it.reason) for it in items if isinstance(it, BadImage)]
    if good:
        images = torch.stack([img for img, _ in good])
        label_list = [label for _, label in good]
        labels = torch.tensor(label_list, dtype=torch.long) if num_labels is None else multi_hot(label_list, num_labels)
    else:  # keep the shapes a model expects, so a step can check for N == 0 instead of crashing
        images = torch.empty((0, *image_shape), dtype=torch.float32)
        labels = torch.empty((0,), dtype=torch.long) if num_labels is None else torch.empty((0, num_labels))
    return Batch(images, labels, bad)


class ImageDataModule(pl.LightningDataModule):
    def __init__(
        self,
        splits: DataSplits,
        transforms: Transforms,
        loading: LoaderSettings,
        bad_images: BadImages,
        decoder: Optional[DeviceDecoder] = None,  # data.decode=gpu: workers read bytes, this decodes them
        resume_start: Optional[ResumeStart] = None,  # where a restored run's interrupted epoch resumes
    ):
        super().__init__()
        self.splits = splits
        self.transforms = transforms
        self.loading = loading
        self.bad = bad_images
        self.decoder = decoder
        self.resume_start = resume_start
        self.batch_size = loading.batch_size  # an attribute: Lightning's batch-size Tuner scales it
        self.eval_batch_size = loading.eval_batch_size
        self._samples: Optional[dict] = None

    # ------------------------------------------------------------ metadata

    @property
    def class_names(self) -> List[str]:
        return list(self.splits.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.splits.class_names)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return self.transforms.image_shape

    @property
    def data_config(self) -> dict:
        return self.transforms.data_config

    @property
    def bad_images(self) -> List[Tuple[str, str]]:
        return self.bad.items

    def samples(self, split: str) -> List[Sample]:
        """The split's samples after setup()'s scan, in loader order (unshuffled)."""
        self.setup()
        assert self._samples is not None
        if split not in self._samples:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self._samples[split]

    # ------------------------------------------------------------ bad images

    def strip_bad(self, batch: Any, device: Any = None) -> Any:
        """(images, labels) of a loader batch, recording the images it dropped. Code that iterates a loader
        itself (outside a Trainer that has this data module) calls this on each batch. With data.decode=gpu
        the images are decoded here, on `device` (default: the decoder's)."""
        if isinstance(batch, EncodedBatch) and self.decoder is not None:
            images, labels, bad = self.decoder.decode(batch, device)
            self.bad.record(bad)
            return images, labels
        if not isinstance(batch, Batch):
            return batch
        if batch.bad:
            self.bad.record([tuple(b) for b in batch.bad])  # pin_memory turns the inner tuples into lists
        return batch.images, batch.labels

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Runs in the main process, where the set of bad images and the log live; workers cannot share them.
        return self.strip_bad(batch)

    # ------------------------------------------------------------ setup and loaders

    def setup(self, stage: Optional[str] = None) -> None:
        if self._samples is not None:  # Lightning calls setup once per stage; the scan is needed only once
            return
        every = [s for split in SPLITS for s in getattr(self.splits, split)]
        # Budget = everything here, so all bad files get logged; record() then enforces the real budget.
        bad = scan_images(every, budget=len(every))
        self.bad.record(bad)
        dropped = {p for p, _ in bad}
        self._samples = {split: [s for s in getattr(self.splits, split) if s[0] not in dropped] for split in SPLITS}
        for split in ("train", "val"):
            if getattr(self.splits, split) and not self._samples[split]:  # an empty val: data.val_fraction=0
                from transfer_cli.data.images import format_bad

                raise TransferError(f"every image of the {split} split is unreadable:\n{format_bad(bad)}",
                                    "remove or repair those files")

    def dataset(self, split: str, augment: bool) -> Any:
        """The split's images as the loaders read them: decoded and transformed, or (data.decode=gpu) bytes."""
        samples = self.samples(split)
        if self.decoder is not None:
            return self.decoder.dataset(samples, augment)
        return ImageDataset(samples, self.transforms.pick(augment))

    def collate(self, augment: bool) -> Any:
        num_labels = self.num_classes if self.splits.multilabel else None
        if self.decoder is not None:
            return partial(collate_encoded, augment=bool(augment),
                           collate_labels=partial(multi_hot, num_labels=num_labels) if num_labels else None)
        return partial(collate_drop_bad, image_shape=self.image_shape, num_labels=num_labels)

    def loader(self, split: str, augment: bool, shuffle: bool = False) -> DataLoader:
        """A DataLoader over one split; e.g. loader("train", augment=False) gives the training images with eval
        preprocessing, in a fixed order, for precomputing frozen-backbone features."""
        samples = self.samples(split)
        if not samples:
            fraction = "data.test_fraction=0.1" if split == "test" else "data.val_fraction=0.2"
            raise TransferError(f"the data set has no {split} split",
                                f"add a {split}/ folder (or split={split} rows), or set {fraction}")
        dataset, sampler = self.dataset(split, augment), None
        if shuffle:  # data.sampler: a (seed, epoch) shuffle, or class-balanced draws
            base = train_sampler(self.loading.sampler, [s[1] for s in samples], self.loading.seed)
            # Augmentation seeded by (seed, epoch, image) and a sampler that skips the batches an interrupted
            # epoch already trained on: a resumed run sees exactly the images an uninterrupted one would. With
            # data.decode=gpu the workers draw each image's crop and flips (or its seed) under the same seed.
            dataset = SeededItems(dataset, self.loading.seed, seeding.AUGMENT)
            sampler = ResumableSampler(base, keys=True, resume_start=self._batches_to_draws)
        batch_size = self.batch_size if augment else self.eval_batch_size  # the batch-size Tuner sets these
        # A last training batch of one image breaks BatchNorm in train mode ("expected more than 1 value per
        # channel"): drop just that one, never a larger remainder, unless the batches must all have one shape.
        drop_last = bool(shuffle) and batch_size > 1 and (
            len(samples) % batch_size == 1 or (self.loading.static_shapes and len(samples) > batch_size))
        return make_loader(dataset, batch_size, num_workers=self.loading.num_workers, seed=self.loading.seed,
                           sampler=sampler, collate_fn=self.collate(augment), drop_last=drop_last,
                           # Encoded batches stay in pageable memory: nvJPEG copies the compressed bytes itself.
                           pin_memory=torch.cuda.is_available() and self.decoder is None)

    def _batches_to_draws(self) -> Optional[Tuple[int, int]]:
        start = self.resume_start() if self.resume_start is not None else None
        return None if start is None else (start[0], start[1] * self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", augment=True, shuffle=True)

    def val_dataloader(self) -> Any:
        # No validation split (data.val_fraction=0): no loader, even when a debug preset asks for val batches.
        return self.loader("val", augment=False) if self.samples("val") else []

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", augment=False)

    def predict_dataloader(self) -> DataLoader:
        return self.loader("test" if self.splits.test else "val", augment=False)


__all__ = ["ImageDataModule", "Batch", "collate_drop_bad", "multi_hot"]
