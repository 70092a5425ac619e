"""`train(cfg)`: one training run from a composed config, returning its summary. Tests call this directly."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from transfer_cli.data.datamodule import ImageDataModule
from transfer_cli.data.sources import DataSplits, discover
from transfer_cli.models.backbone import create_backbone, resolve_data_config
from transfer_cli.models.classifier import Classifier
from transfer_cli.models.named_weights import NAMED_WEIGHTS
from transfer_cli.reporting import print_config_tree, print_summary
from transfer_cli.training.features import FeatureDataModule, use_feature_cache
from transfer_cli.training.module import TransferModule
from transfer_cli.training.trainer import CHECKPOINT_DIR, build_trainer

log = logging.getLogger("transfer_cli")


def _plain(value: Any) -> Any:
    """Tuples to lists, so the metadata is plain JSON/YAML-able data inside checkpoints."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _metric(trainer: pl.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


@dataclass
class RunParts:
    """Everything a command needs to run the configured experiment: train, lr-find and previews share it."""

    splits: DataSplits
    model: Classifier
    images: ImageDataModule
    datamodule: pl.LightningDataModule  # `images`, or the cached features of the frozen backbone
    module: TransferModule
    trainer: pl.Trainer
    feature_cache: bool


def build_data(cfg: DictConfig, run_dir: Path) -> tuple[DataSplits, Classifier, ImageDataModule, dict]:
    """Discover the data, build the model, and the image datamodule with the model's preprocessing."""
    splits = discover(cfg.data)
    log.info("data: %s", splits.source_desc)
    backbone = create_backbone(cfg.model)
    named = NAMED_WEIGHTS.get(cfg.model.weights) if cfg.model.weights else None
    data_config = resolve_data_config(backbone, cfg.data, named)
    model = Classifier(backbone, len(splits.class_names), cfg.model.head_hidden_dim, cfg.model.head_dropout)
    images = ImageDataModule(splits, data_config, cfg.data, cfg.augmentation, seed=cfg.seed,
                             bad_image_log=run_dir / "bad_images.txt")
    meta = {
        "class_names": list(splits.class_names),
        "class_to_idx": {name: i for i, name in enumerate(splits.class_names)},
        "data_config": _plain(dict(data_config)),
        "backbone": cfg.model.backbone,
        "num_features": model.num_features,
    }
    return splits, model, images, meta


def build_run(cfg: DictConfig, run_dir: Path) -> RunParts:
    pl.seed_everything(cfg.seed, workers=True)
    splits, model, images, meta = build_data(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir)
    cache, why = use_feature_cache(cfg)
    log.info("feature cache %s", why)
    datamodule = FeatureDataModule(images, model, trainer) if cache else images
    module = TransferModule(model, cfg, meta, inputs="features" if cache else "images")
    return RunParts(splits, model, images, datamodule, module, trainer, cache)


def train(cfg: DictConfig) -> dict:
    started = time.time()
    run_dir = Path(cfg.paths.output_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.paths.output_dir = str(run_dir)  # resolved once: checkpoints and config.yaml carry the real path
    print_config_tree(cfg)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    run = build_run(cfg, run_dir)
    splits, images, datamodule, module, trainer = run.splits, run.images, run.datamodule, run.module, run.trainer
    trainer.fit(module, datamodule=datamodule)

    ckpt = trainer.checkpoint_callback
    best_path = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    best_score = float(ckpt.best_model_score) if ckpt is not None and ckpt.best_model_score is not None else None
    last = run_dir / CHECKPOINT_DIR / "last.ckpt"
    summary: dict[str, Any] = {
        "name": cfg.name,
        "val_acc": best_score if best_score is not None else _metric(trainer, "val/acc"),
        "test_acc": None,
        "epochs": int(trainer.current_epoch),
        "best_checkpoint": best_path,
        "last_checkpoint": str(last) if last.is_file() else None,
        "run_dir": str(run_dir),
        "num_classes": len(splits.class_names),
        "class_names": list(splits.class_names),
        "train_size": len(splits.train),
        "val_size": len(splits.val),
        "test_size": len(splits.test),
        "feature_cache": run.feature_cache,
        "bad_images": len(images.bad_images),
    }
    if splits.test:
        trainer.test(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)
        summary["test_acc"] = _metric(trainer, "test/acc")
    summary["wall_time_s"] = round(time.time() - started, 1)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary
