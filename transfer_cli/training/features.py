"""Frozen backbone + deterministic inputs: run the backbone once, then train the head on stored features.

Every epoch would otherwise recompute identical features; on a CPU that is nearly all of the run's time. The
features are computed in batches on the run's device and precision, without autograd, and kept in the on-disk
store of training/feature_cache.py, so the next run over the same images and backbone skips the backbone too.

With augmentation, `transfer.cache_views=K` stores K augmented views of each training image instead (view k of
image i draws its crop and flips from a seed derived from (seed, k, i), so it is the same in every run and with
any number of workers); epoch e trains on view e % K. Validation and test always use the eval transform.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Dict, List, Optional

import numpy as np
import pytorch_lightning as pl
import timm
import torch
import torchvision
from omegaconf import OmegaConf
from rich.progress import Progress
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from transfer_cli.data.datamodule import ImageDataModule, collate_drop_bad
from transfer_cli.data.images import ImageDataset
from transfer_cli.data.samplers import train_sampler
from transfer_cli.data.transforms import build_transform
from transfer_cli.errors import TransferError
from transfer_cli.models.classifier import Classifier
from transfer_cli.training.feature_cache import (
    FORMAT, CachedSplit, FeatureStore, files_digest, fingerprint, weights_digest,
)

log = logging.getLogger("transfer_cli")

_HEAD_ONLY_KEYS = ("head_hidden_dim", "head_dropout")  # model.* keys that do not change the features


def cached_views(cfg: Any) -> int:
    """How many augmented views of each training image are stored: 0 means the deterministic eval transform."""
    views = int(OmegaConf.select(cfg, "transfer.cache_views", default=0) or 0)
    return views if cfg.augmentation.name != "none" and views > 0 else 0


def use_feature_cache(cfg: Any) -> tuple[bool, str]:
    """(whether to cache, the reason), from transfer.cache_features = auto | true | false."""
    setting = str(cfg.transfer.cache_features)
    if setting == "false":
        return False, "off (transfer.cache_features=false)"
    blockers = []
    if cfg.transfer.mode != "feature_extract":
        blockers.append(f"the backbone trains (transfer.mode={cfg.transfer.mode})")
    bn = OmegaConf.select(cfg, "transfer.bn", default="frozen")
    if bn != "frozen":
        blockers.append(f"transfer.bn={bn} lets BatchNorm use each batch's statistics")
    if cfg.augmentation.name != "none" and cached_views(cfg) == 0:
        blockers.append(f"augmentation '{cfg.augmentation.name}' changes the images every epoch "
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
    where = (f"stored in {cfg.transfer.cache_dir}" if cfg.transfer.cache_dir
             else "kept in memory for this run (transfer.cache_dir=null)")
    views = cached_views(cfg)
    what = f"{views} augmented views of each training image" if views else "the backbone's features"
    return True, f"on: {what} computed once, {where}; the head trains on them"


def view_seed(seed: int, view: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed) % 2**64, view, index]).generate_state(1)[0])


class SeededView(Dataset):
    """`dataset[i]` with torch's RNG seeded from (seed, view, i): random transforms give the same view of an
    image in every run, whatever the worker count, and leave the global RNG untouched."""

    def __init__(self, dataset: ImageDataset, seed: int, view: int):
        self.dataset, self.seed, self.view = dataset, int(seed), int(view)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(self.seed, self.view, index))
            return self.dataset[index]


class EpochViewSampler(Sampler[int]):
    """Indices into K stacked views of the training set: epoch e draws `base`'s indices from view e % K."""

    def __init__(self, base: Sampler[int], num_rows: int, views: int):
        self.base, self.num_rows, self.views = base, int(num_rows), int(views)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every training epoch
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self):
        offset = (self.epoch % self.views) * self.num_rows
        return (offset + int(i) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)


@torch.no_grad()
def run_backbone(model: Classifier, loader: DataLoader, images: ImageDataModule, trainer: pl.Trainer,
                 label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of every decodable image the loader yields, in order; failures go to `images`."""
    device = trainer.strategy.root_device
    # channels_last: oneDNN and cuDNN convolutions run faster in it (1.7x for EfficientNet-Lite0 on 2 CPU cores).
    backbone = model.backbone.to(device, memory_format=torch.channels_last).eval()
    feats, targets = [], []
    with Progress(transient=True) as progress:
        task = progress.add_task(f"features: {label}", total=len(loader))
        for batch in loader:
            x, target = images.strip_bad(batch, device)  # records (and, with data.decode=gpu, decodes) images
            if len(target):
                with trainer.precision_plugin.forward_context():
                    out = backbone(x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))
                feats.append(out.float().cpu())
                targets.append(target.cpu())
            progress.advance(task)
    x = torch.cat(feats) if feats else torch.empty(0, model.num_features)
    y = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long)
    return x, y


class FeatureDataModule(pl.LightningDataModule):
    """The image datamodule's splits as (feature, label) tensors, with the same batch sizes and sampler.

    The features are computed (or read from the store) in setup(), which the Trainer calls at fit start.
    """

    def __init__(self, images: ImageDataModule, model: Classifier, trainer: pl.Trainer, cfg: Any):
        super().__init__()
        self.images = images
        self.model = model
        self.run_trainer = trainer  # not `trainer`: Lightning sets that attribute itself
        self.cfg = cfg
        self.seed = images.seed
        self.batch_size = images.batch_size
        self.eval_batch_size = images.eval_batch_size
        self.views = cached_views(cfg)
        self.store = FeatureStore(cfg.transfer.cache_dir)
        self.splits: Dict[str, TensorDataset] = {}
        self.train_rows = 0  # images per training view
        self.train_labels: List[Any] = []  # their labels as the samples hold them (for data.sampler)
        self.hits = 0  # entries read from the store in setup(), e.g. for tests and the benchmark
        self.misses = 0

    # ------------------------------------------------------------ computing or loading

    def _common_parts(self) -> dict:
        model_cfg = OmegaConf.to_container(self.cfg.model, resolve=True)
        for key in _HEAD_ONLY_KEYS:
            model_cfg.pop(key, None)
        backbone = self.model.backbone
        return {
            "format": FORMAT,
            "model": model_cfg,
            "backbone_class": f"{type(backbone).__module__}.{type(backbone).__qualname__}",
            "weights": weights_digest(backbone),
            "data_config": self.images.data_config,
            "precision": str(self.cfg.trainer.precision),
            "device": self.run_trainer.strategy.root_device.type,
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                         "timm": timm.__version__},
        }

    def _loader(self, split: str, view: Optional[int]) -> DataLoader:
        if view is None:
            return self.images.loader(split, augment=False, shuffle=False)
        images = self.images
        transform = build_transform(images.data_config, self.cfg.augmentation, train=True)
        multilabel = images.splits.multilabel
        return DataLoader(
            SeededView(ImageDataset(images.samples(split), transform), self.seed, view),
            batch_size=images.eval_batch_size,
            num_workers=images.num_workers,
            pin_memory=torch.cuda.is_available(),
            collate_fn=partial(collate_drop_bad, image_shape=images.image_shape,
                               num_labels=images.num_classes if multilabel else None),
            generator=torch.Generator().manual_seed(self.seed),  # keeps the global RNG untouched
        )

    def _entry(self, split: str, view: Optional[int], common: dict) -> CachedSplit:
        images = self.images
        samples = images.samples(split)
        augmented = view is not None
        decode = "gpu" if images.device_decoder is not None and not augmented else "cpu"
        transform = build_transform(images.data_config, self.cfg.augmentation if augmented else None, train=augmented)
        parts = {
            "common": common,
            "split": split,
            "transform": repr(transform),
            "decode": decode,
            "view": {"index": view, "seed": self.seed,
                     "augmentation": OmegaConf.to_container(self.cfg.augmentation, resolve=True)} if augmented else None,
            "files": files_digest(samples),
        }
        tag = f"{split}-view{view}" if augmented else split
        key = f"{tag}-{fingerprint(parts)[:32]}"
        width = self.model.num_features
        entry = self.store.load(key, len(samples), width)
        if entry is not None:
            self.hits += 1
            log.info("feature cache hit: %s (%d images) from %s", tag, len(samples), self.store.path(key))
            images.record_bad(entry.bad)
            return entry
        self.misses += 1
        log.info("feature cache miss: computing %s features of %d images", tag, len(samples))
        x, y = run_backbone(self.model, self._loader(split, view), images, self.run_trainer, tag)
        paths = {p for p, _ in samples}
        bad = [(p, r) for p, r in images.bad_images if p in paths]
        entry = CachedSplit(x, y, bad)
        saved = self.store.save(key, entry)
        if saved is not None:
            log.info("feature cache: stored %s features %s in %s", tag, tuple(x.shape), saved)
        return entry

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:  # fit, then test: computed once
            return
        images = self.images
        images.setup("fit")
        common = self._common_parts()
        for split in ("train", "val", "test"):
            if not images.samples(split):
                continue
            if split == "train" and self.views:
                entries = [self._entry(split, k, common) for k in range(self.views)]
            else:
                entries = [self._entry(split, None, common)]
            rows = {len(e.labels) for e in entries}
            if len(rows) != 1:  # an image failing in one view but not another: decoding is not deterministic
                raise TransferError(f"the cached views of the {split} split differ in length ({sorted(rows)})",
                                    "transfer.cache_views=0, or repair the images listed in bad_images.txt")
            x = torch.cat([e.features for e in entries])
            y = torch.cat([e.labels for e in entries])
            self.splits[split] = TensorDataset(x, y)
            if split == "train":
                self.train_rows = rows.pop()
                dropped = {p for p, _ in entries[0].bad}
                self.train_labels = [label for p, label in images.samples(split) if p not in dropped]
        log.info("cached features: %s", {k: tuple(v.tensors[0].shape) for k, v in self.splits.items()})

    # ------------------------------------------------------------ loaders

    def train_dataloader(self) -> DataLoader:
        data = self.splits["train"]
        kind = getattr(self.images.data_cfg, "sampler", "shuffle")
        sampler: Sampler[int] = train_sampler(kind, self.train_labels, self.seed)
        if self.views:
            sampler = EpochViewSampler(sampler, self.train_rows, self.views)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=self.eval_batch_size)


__all__ = ["FeatureDataModule", "use_feature_cache", "cached_views", "run_backbone", "SeededView",
           "EpochViewSampler"]
