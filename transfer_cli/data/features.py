"""Frozen backbone + deterministic inputs: run the backbone once, then train the head on stored features.

Every epoch would otherwise recompute identical features; on a CPU that is nearly all of the run's time. The
pre-pass computes them in batches on a given device and autocast, without autograd (transfer_cli/inference.py),
and keeps them in the on-disk store of data/feature_store.py, so the next run over the same images and backbone
skips the backbone too. `FeatureDataModule` then serves the stored tensors with the image datamodule's batch
sizes and sampler.

With augmentation, `transfer.cache_views=K` stores K augmented views of each training image instead (view k of
image i draws its crop and flips from a seed derived from (seed, k, i), so it is the same in every run and with
any number of workers); epoch e trains on view e % K. Validation and test always use the eval transform.
"""

from __future__ import annotations

import logging
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import pytorch_lightning as pl
import timm
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from transfer_cli import seeding
from transfer_cli.data.datamodule import ImageDataModule, collate_drop_bad
from transfer_cli.data.feature_store import CachedSplit, FeatureStore, FORMAT, cache_key, files_digest, weights_digest
from transfer_cli.data.images import ImageDataset
from transfer_cli.data.loaders import LoaderSettings, make_loader
from transfer_cli.data.samplers import EpochViewSampler, ResumableSampler, ResumeStart, train_sampler
from transfer_cli.data.seeded import SeededItems
from transfer_cli.errors import TransferError
from transfer_cli.inference import infer
from transfer_cli.threads import CalibratedCpuForward

log = logging.getLogger("transfer_cli")


def feature_cache_plan(setting: str, mode: str, frozen_backbone: bool, bn: str, augmentation: str, views: int,
                       cache_dir: Optional[str]) -> Tuple[bool, str]:
    """(whether to cache, the reason), from transfer.cache_features = auto | true | false and what it needs:
    a frozen backbone (mode, bn) and deterministic inputs (no augmentation, or `views` cached views)."""
    if setting == "false":
        return False, "off (transfer.cache_features=false)"
    blockers = []
    if not frozen_backbone:
        blockers.append(f"the backbone trains (transfer.mode={mode})")
    if bn == "train":
        blockers.append(f"transfer.bn={bn} lets BatchNorm use each batch's statistics")
    if augmentation != "none" and views == 0:
        blockers.append(f"augmentation '{augmentation}' changes the images every epoch "
                        "(transfer.cache_views=K caches K augmented views)")
    # Mixup and eval.tta do not block it: TransferModule warns that it ignores them on cached features.
    if blockers:
        if setting == "true":
            raise TransferError(
                "transfer.cache_features=true needs a frozen backbone and deterministic inputs, but "
                + " and ".join(blockers),
                "use transfer=feature_extract augmentation=none (or transfer.cache_views=K), "
                "or transfer.cache_features=auto",
            )
        return False, "off: " + " and ".join(blockers)
    where = f"stored in {cache_dir}" if cache_dir else "kept in memory for this run (transfer.cache_dir=null)"
    what = f"{views} augmented views of each training image" if views else "the backbone's features"
    return True, f"on: {what} computed once, {where}; the head trains on them"


@dataclass
class FeatureSplits:
    """What the pre-pass leaves: each split's (features, labels) and what the training sampler needs."""

    tensors: Dict[str, TensorDataset] = field(default_factory=dict)
    train_rows: int = 0  # images per training view
    train_labels: List[Any] = field(default_factory=list)  # their labels as the samples hold them (data.sampler)
    hits: int = 0  # entries read from the store, e.g. for tests and the benchmark
    misses: int = 0


class FeaturePass:
    """Computes (or reads from the store) the backbone's features of every split of an image datamodule.

    `identity`: what else shapes the features besides the weights and images (the model config without the
    head's keys, the preprocessing, the precision); `augmentation`: the augmentation record, part of a view's key.
    """

    def __init__(self, images: ImageDataModule, backbone: torch.nn.Module, *, store: FeatureStore, width: int,
                 device: torch.device, autocast: Callable[[], ContextManager], channels_last: bool,
                 identity: Dict[str, Any], views: int = 0, view_transform: Optional[Callable] = None,
                 augmentation: Optional[Dict[str, Any]] = None):
        self.images, self.backbone, self.store, self.width = images, backbone, store, int(width)
        self.device, self.autocast, self.channels_last = device, autocast, channels_last
        self.identity, self.views = identity, int(views)
        self.view_transform, self.augmentation = view_transform, augmentation
        self.seed = images.loading.seed
        self._cpu_forward: Optional[CalibratedCpuForward] = None  # one calibration for every split of the pass

    def _common(self) -> dict:
        backbone = self.backbone
        return {
            "format": FORMAT,
            **self.identity,
            "backbone_class": f"{type(backbone).__module__}.{type(backbone).__qualname__}",
            "weights": weights_digest(backbone),
            "device": self.device.type,
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                         "timm": timm.__version__},
        }

    def _loader(self, split: str, view: Optional[int]) -> DataLoader:
        images = self.images
        if view is None:
            return images.loader(split, augment=False, shuffle=False)
        dataset = SeededItems(ImageDataset(images.samples(split), self.view_transform), self.seed, seeding.VIEW,
                              prefix=(view,))
        # Views decode on the CPU whatever data.decode says: their random crops are the CPU pipeline's.
        collate = partial(collate_drop_bad, image_shape=images.image_shape,
                          num_labels=images.num_classes if images.splits.multilabel else None)
        return make_loader(dataset, images.eval_batch_size, num_workers=images.loading.num_workers, seed=self.seed,
                           collate_fn=collate)

    def _compute(self, loader: DataLoader, label: str) -> Tuple[torch.Tensor, torch.Tensor]:
        backbone = self.backbone.to(self.device).eval()
        if self.channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        if self.device.type == "cpu":  # threads or one-thread chunks, whichever runs faster here (the first batches)
            if self._cpu_forward is None:
                self._cpu_forward = CalibratedCpuForward(backbone)
            backbone = self._cpu_forward
        x, y = infer(backbone, loader, device=self.device, autocast=self.autocast, channels_last=self.channels_last,
                     prepare=lambda batch: self.images.strip_bad(batch, self.device), progress=f"features: {label}",
                     total=len(loader))
        return (x if len(x) else torch.empty(0, self.width)), y

    def _entry(self, split: str, view: Optional[int], common: dict, result: FeatureSplits) -> CachedSplit:
        images = self.images
        samples = images.samples(split)
        augmented = view is not None
        transform = self.view_transform if augmented else images.transforms.eval
        parts = {
            "common": common,
            "split": split,
            "transform": repr(transform),
            "decode": "gpu" if images.decoder is not None and not augmented else "cpu",
            "view": {"index": view, "seed": self.seed, "augmentation": self.augmentation} if augmented else None,
            "files": files_digest(samples),
        }
        tag = f"{split}-view{view}" if augmented else split
        key = f"{tag}-{cache_key(parts)[:32]}"
        entry = self.store.load(key, len(samples), self.width)
        if entry is not None:
            result.hits += 1
            log.info("feature cache hit: %s (%d images) from %s", tag, len(samples), self.store.path(key))
            images.bad.record(entry.bad)
            return entry
        result.misses += 1
        log.info("feature cache miss: computing %s features of %d images", tag, len(samples))
        x, y = self._compute(self._loader(split, view), tag)
        paths = {p for p, _ in samples}
        entry = CachedSplit(x, y, [(p, r) for p, r in images.bad_images if p in paths])
        saved = self.store.save(key, entry)
        if saved is not None:
            log.info("feature cache: stored %s features %s in %s", tag, tuple(x.shape), saved)
        return entry

    def run(self, splits: Tuple[str, ...] = ("train", "val", "test")) -> FeatureSplits:
        """The features of `splits` (those the data has), computed or read from the store."""
        images = self.images
        images.setup("fit")
        common = self._common()
        result = FeatureSplits()
        for split in splits:
            if not images.samples(split):
                continue
            views = range(self.views) if split == "train" and self.views else [None]
            entries = [self._entry(split, view, common, result) for view in views]
            rows = {len(e.labels) for e in entries}
            if len(rows) != 1:  # an image failing in one view but not another: decoding is not deterministic
                raise TransferError(f"the cached views of the {split} split differ in length ({sorted(rows)})",
                                    "transfer.cache_views=0, or repair the images listed in bad_images.txt")
            result.tensors[split] = TensorDataset(torch.cat([e.features for e in entries]),
                                                  torch.cat([e.labels for e in entries]))
            if split == "train":
                result.train_rows = rows.pop()
                dropped = {p for p, _ in entries[0].bad}
                result.train_labels = [label for p, label in images.samples(split) if p not in dropped]
        log.info("cached features: %s", {k: tuple(v.tensors[0].shape) for k, v in result.tensors.items()})
        return result


EVAL_BATCH_BYTES = 64 << 20


class FeatureDataModule(pl.LightningDataModule):
    """Stored (feature, label) tensors of each split, with the image datamodule's batch sizes and sampler.

    The pre-pass runs in setup(), which the Trainer calls at fit start (and `features` then holds its result).
    """

    def __init__(self, feature_pass: FeaturePass, loading: LoaderSettings, views: int = 0,
                 resume_start: Optional[ResumeStart] = None):
        super().__init__()
        self.feature_pass = feature_pass
        self.features: Optional[FeatureSplits] = None
        self.loading = loading
        self.views = int(views)
        self.resume_start = resume_start
        self.batch_size = loading.batch_size  # attributes: Lightning's batch-size Tuner scales them
        self.eval_batch_size = loading.eval_batch_size

    def setup(self, stage: Optional[str] = None) -> None:
        if self.features is None:  # fit, then test: computed once
            self.features = self.feature_pass.run()

    def _split(self, split: str) -> TensorDataset:
        self.setup()
        assert self.features is not None
        return self.features.tensors[split]

    def _batches_to_draws(self) -> Optional[Tuple[int, int]]:
        start = self.resume_start() if self.resume_start is not None else None
        return None if start is None else (start[0], start[1] * self.batch_size)

    def train_dataloader(self) -> DataLoader:
        data = self._split("train")
        assert self.features is not None
        sampler: Any = train_sampler(self.loading.sampler, self.features.train_labels, self.loading.seed)
        if self.views:
            sampler = EpochViewSampler(sampler, self.features.train_rows, self.views)
        sampler = ResumableSampler(sampler, resume_start=self._batches_to_draws)
        return make_loader(data, self.batch_size, sampler=sampler, seed=self.loading.seed, pin_memory=False)

    def val_dataloader(self) -> Any:
        self.setup()
        assert self.features is not None
        if "val" not in self.features.tensors:  # no validation split (data.val_fraction=0)
            return []
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        # Rows of features are small: evaluating in batches of up to EVAL_BATCH_BYTES (a whole split of most data
        # sets) costs the same arithmetic as eval_batch_size but one step's fixed cost, not one per 64 rows.
        data = self._split(split)
        row_bytes = max(1, data.tensors[0][:1].numel() * data.tensors[0].element_size())
        return make_loader(data, max(self.eval_batch_size, EVAL_BATCH_BYTES // row_bytes), pin_memory=False)


__all__ = ["FeaturePass", "FeatureSplits", "FeatureDataModule", "feature_cache_plan"]
