"""The data of a run from the data, augmentation and transfer groups: samples, loaders, decoding, features."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, ContextManager, Optional

import torch

from transfer_cli.config.modes import transfer_mode
from transfer_cli.assembly.model import compile_mode
from transfer_cli.assembly.sources import SOURCES, discover  # noqa: F401 - re-exported: the data builders
from transfer_cli.config.resolve import eval_batch_size
from transfer_cli.config.schema import TrainConfig
from transfer_cli.data.datamodule import ImageDataModule
from transfer_cli.data.feature_store import FeatureStore
from transfer_cli.data.features import FeaturePass, feature_cache_plan
from transfer_cli.data.gpu_decode import DeviceDecoder, resolve_decode
from transfer_cli.data.images import BadImages
from transfer_cli.data.loaders import LoaderSettings, resolve_num_workers
from transfer_cli.data.samplers import ResumeStart
from transfer_cli.data.splits import DataSplits
from transfer_cli.data.transforms import Transforms, build_transform, build_transforms
from transfer_cli.models.classifier import Classifier

log = logging.getLogger("transfer_cli")

# model.* keys that do not change what the backbone computes (they shape only the head)
_HEAD_ONLY_KEYS = ("head_hidden_dim", "head_dropout")


def loader_settings(cfg: TrainConfig) -> LoaderSettings:
    data = cfg.data
    return LoaderSettings(batch_size=int(data.batch_size), eval_batch_size=eval_batch_size(data),
                          num_workers=resolve_num_workers(data.num_workers), sampler=data.sampler, seed=int(cfg.seed),
                          static_shapes=compile_mode(cfg.trainer.compile) is not None)


def image_data(cfg: TrainConfig, splits: DataSplits, data_config: dict, bad_log: Optional[Path] = None,
               device: Optional[torch.device] = None, resume_start: Optional[ResumeStart] = None) -> ImageDataModule:
    """The image datamodule; `device`: the run's device, which decodes the images with data.decode=gpu."""
    transforms = build_transforms(data_config, cfg.augmentation)
    decoder = decoder_for(cfg, transforms, device) if device is not None else None
    return ImageDataModule(splits, transforms, loader_settings(cfg), BadImages(cfg.data.max_bad_images, bad_log),
                           decoder=decoder, resume_start=resume_start)


def decoder_for(cfg: TrainConfig, transforms: Transforms, device: torch.device) -> Optional[DeviceDecoder]:
    """data.decode=gpu on a CUDA device: workers read JPEG bytes and the device decodes them; else None."""
    decode_device = resolve_decode(cfg.data.decode, device)
    if decode_device is None:
        return None
    decoder = DeviceDecoder.for_transforms(transforms, decode_device)
    log.info("data.decode=gpu: %s; other formats decoded by the CPU workers", decoder.describe())
    return decoder


def cached_views(cfg: TrainConfig) -> int:
    """How many augmented views of each training image are stored: 0 means the deterministic eval transform."""
    views = int(cfg.transfer.cache_views or 0)
    return views if cfg.augmentation.name != "none" and views > 0 else 0


def cache_plan(cfg: TrainConfig) -> tuple[bool, str]:
    """(whether the head trains on cached backbone features, why)."""
    t = cfg.transfer
    if cfg.trainer.fast_dev_run and t.cache_features != "true":  # one batch means one batch, not every image's features
        return False, "off: trainer.fast_dev_run runs one batch (transfer.cache_features=true caches anyway)"
    return feature_cache_plan(t.cache_features, t.mode, transfer_mode(t.mode).frozen_backbone, t.bn,
                              cfg.augmentation.name, cached_views(cfg), t.cache_dir)


def feature_pass(cfg: TrainConfig, images: ImageDataModule, model: Classifier, device: torch.device,
                 autocast: Callable[[], ContextManager], views: Optional[int] = None) -> FeaturePass:
    """The pre-pass computing the frozen backbone's features of every split (or reading them from
    transfer.cache_dir); `views`: augmented training views to store instead (None: the config's)."""
    model_cfg = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in _HEAD_ONLY_KEYS}
    identity = {"model": model_cfg, "data_config": images.data_config, "precision": str(cfg.trainer.precision)}
    views = cached_views(cfg) if views is None else views
    return FeaturePass(
        images, model.backbone, store=FeatureStore(cfg.transfer.cache_dir), width=model.num_features, device=device,
        autocast=autocast, channels_last=bool(cfg.trainer.channels_last), identity=identity, views=views,
        view_transform=build_transform(images.data_config, cfg.augmentation, train=True) if views else None,
        augmentation=dataclasses.asdict(cfg.augmentation) if views else None,
    )


__all__ = ["SOURCES", "discover", "loader_settings", "image_data", "decoder_for", "cached_views", "cache_plan",
           "feature_pass"]
