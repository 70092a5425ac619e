"""A whole run assembled from its config: data, network, trainer and module, in the order they depend on."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import pytorch_lightning as pl

from transfer_cli.assembly.data import cache_plan, discover, feature_pass, image_data, loader_settings, cached_views
from transfer_cli.assembly.model import build_model, checkpoint_block, prepare_for_training, run_meta
from transfer_cli.assembly.module import transfer_module
from transfer_cli.assembly.probe import head_fit, head_solver, solver_config
from transfer_cli.assembly.trainer import add_callbacks, build_trainer
from transfer_cli.config.resolve import resolve_run
from transfer_cli.config.schema import TrainConfig
from transfer_cli.data.datamodule import ImageDataModule
from transfer_cli.data.features import FeatureDataModule, FeatureSplits
from transfer_cli.data.splits import DataSplits
from transfer_cli.inference import autocast_for
from transfer_cli.models.classifier import Classifier
from transfer_cli.resume.replay import ResumePoint
from transfer_cli.tracking.first_step import FirstStepLatency
from transfer_cli.training.module import TransferModule
from transfer_cli.training.probe_head import ProbeFit, ProbeModule
from transfer_cli.threads import SmallWorkThreads
from transfer_cli.run_files import RunLayout

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger("transfer_cli")


@dataclass
class RunParts:
    """Everything a command needs to run the configured experiment: train, lr-find and previews share it."""

    cfg: TrainConfig
    splits: DataSplits
    model: Classifier
    images: ImageDataModule
    datamodule: pl.LightningDataModule  # `images`, or the cached features of the frozen backbone
    module: TransferModule
    trainer: pl.Trainer
    feature_cache: bool
    first_step: Optional[FirstStepLatency] = None  # the wait from the network built to the first step done
    probe: Optional[ProbeFit] = None  # the linear probe that solves or starts the head, if the run fits one

    @property
    def solved(self) -> bool:
        """The head is solved as a linear probe (transfer.head_solver), not trained by optimizer steps."""
        return self.probe is not None and self.probe.purpose == "solver"

    @property
    def features(self) -> Optional[FeatureSplits]:
        """What the feature pre-pass computed or read (tensors, cache hits and misses), once the fit started."""
        return getattr(self.datamodule, "features", None)


def config_container(cfg: TrainConfig) -> dict:
    """The resolved config as plain data, as it goes into checkpoints."""
    return dataclasses.asdict(cfg)


def build_data(cfg: TrainConfig | DictConfig, run_dir: Path) -> tuple[DataSplits, Classifier, ImageDataModule, dict]:
    """Discover the data, build the model, and the image datamodule with the model's preprocessing (no trainer:
    for previews)."""
    cfg = resolve_run(cfg)  # a resolved config passes through unchanged; a composed one is resolved here
    splits = discover(cfg.data, cfg.task)
    log.info("data: %s", splits.source_desc)
    model, data_config = build_model(cfg, len(splits.class_names))
    images = image_data(cfg, splits, data_config, bad_log=RunLayout(run_dir).bad_images)
    return splits, model, images, run_meta(cfg, splits, data_config, model)


def build_run(cfg: TrainConfig | DictConfig, run_dir: Path) -> RunParts:
    """`cfg`: the run's resolved config (config/resolve.py resolve_run), or a composed one to resolve."""
    cfg = resolve_run(cfg, run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    splits = discover(cfg.data, cfg.task)
    log.info("data: %s", splits.source_desc)
    model, data_config = build_model(cfg, len(splits.class_names))
    first_step = FirstStepLatency(time.perf_counter())
    meta = run_meta(cfg, splits, data_config, model)
    resume_point = ResumePoint()
    cache, why = cache_plan(cfg)
    solve, solver_why = head_solver(cfg, cache)
    trainer = build_trainer(solver_config(cfg) if solve else cfg, run_dir, validate=bool(splits.val),
                            resume_point=resume_point)
    add_callbacks(trainer, first_step)
    device = trainer.strategy.root_device
    images = image_data(cfg, splits, data_config, bad_log=RunLayout(run_dir).bad_images, device=device,
                        resume_start=resume_point.start)
    log.info("feature cache %s", why)
    log.info("head solver: %s", solver_why)
    datamodule: pl.LightningDataModule = images
    if cache:
        datamodule = FeatureDataModule(feature_pass(cfg, images, model, device, autocast_for(device, cfg.trainer.precision)),
                                       loader_settings(cfg), views=cached_views(cfg), resume_start=resume_point.start)
    prepare_for_training(model, cfg, images=not cache)
    module = transfer_module(cfg, model, checkpoint_block(config_container(cfg), meta),
                             inputs="features" if cache else "images", class_counts=splits.counts("train"),
                             device_type=device.type, module_class=ProbeModule if solve else TransferModule)
    probe = head_fit(cfg, splits, images, datamodule, model, device, solve)
    if probe is not None:
        add_callbacks(trainer, probe)
    if cache:  # a head on features: milliseconds a step, faster on one CPU thread (threads.py)
        head_size = sum(p.numel() for p in model.head.parameters())
        add_callbacks(trainer, SmallWorkThreads(max(images.batch_size, images.eval_batch_size) * head_size))
    return RunParts(cfg, splits, model, images, datamodule, module, trainer, cache, first_step, probe)


__all__ = ["RunParts", "build_run", "build_data", "config_container"]
