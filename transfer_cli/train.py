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
from transfer_cli.data.gpu_decode import resolve_decode
from transfer_cli.data.sources import DataSplits, discover
from transfer_cli.lifecycle.fit import fit
from transfer_cli.models.combined import build_backbone
from transfer_cli.models.classifier import Classifier
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


def _write_curves(trainer: pl.Trainer, run_dir: Path, cfg: DictConfig) -> None:
    """curves.png from metrics.csv; a plot never fails a run, so any error is only logged."""
    if not trainer.is_global_zero:
        return
    try:
        from transfer_cli.plots import write_curves

        path = write_curves(run_dir / "metrics.csv", title=f"{cfg.name}: {cfg.model.backbone}, {cfg.transfer.mode}")
        if path is not None:
            log.info("training curves: %s", path)
    except Exception as e:  # noqa: BLE001
        log.warning("could not write curves.png: %s: %s", type(e).__name__, e)


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
    splits = discover(cfg.data, cfg.task)
    log.info("data: %s", splits.source_desc)
    backbone, data_config = build_backbone(cfg.model, cfg.data)
    model = Classifier(backbone, len(splits.class_names), cfg.model.head_hidden_dim, cfg.model.head_dropout)
    images = ImageDataModule(splits, data_config, cfg.data, cfg.augmentation, seed=cfg.seed,
                             bad_image_log=run_dir / "bad_images.txt")
    meta = {
        "class_names": list(splits.class_names),
        "class_to_idx": {name: i for i, name in enumerate(splits.class_names)},
        "data_config": _plain(dict(data_config)),
        "backbone": list(cfg.model.backbones) or cfg.model.backbone,
        "num_features": model.num_features,
        "task": cfg.task,  # multilabel: sigmoid outputs, decoded to label sets at multilabel_threshold
        "multilabel_threshold": float(cfg.multilabel_threshold),
    }
    return splits, model, images, meta


def build_run(cfg: DictConfig, run_dir: Path) -> RunParts:
    pl.seed_everything(cfg.seed, workers=True)
    splits, model, images, meta = build_data(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir, validate=bool(splits.val))
    decode_device = resolve_decode(cfg.data.decode, trainer.strategy.root_device)
    if decode_device is not None:
        images.decode_on(decode_device)
    cache, why = use_feature_cache(cfg)
    log.info("feature cache %s", why)
    datamodule = FeatureDataModule(images, model, trainer, cfg) if cache else images
    module = TransferModule(model, cfg, meta, inputs="features" if cache else "images",
                            class_counts=splits.counts("train"))
    return RunParts(splits, model, images, datamodule, module, trainer, cache)


def _test_checkpoint(cfg: DictConfig, best_path: str | None, last: Path) -> str | None:
    """The checkpoint the end-of-run test loads; None tests the weights as training left them."""
    # A small validation split picks its epoch noisily; `last` takes that pick out of the measurement (with
    # callbacks.ema both checkpoints hold EMA weights).
    if OmegaConf.select(cfg, "callbacks.test_ckpt", default="best") == "last":
        return str(last) if last.is_file() else None
    return best_path


def train(cfg: DictConfig) -> dict:
    started = time.time()
    run_dir = Path(cfg.paths.output_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.paths.output_dir = str(run_dir)  # resolved once: checkpoints and config.yaml carry the real path
    print_config_tree(cfg)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    run = build_run(cfg, run_dir)
    splits, images, datamodule, module, trainer = run.splits, run.images, run.datamodule, run.module, run.trainer
    if cfg.trainer.auto_batch_size:
        from transfer_cli.finders import scale_batch_size

        scale_batch_size(run, cfg)
    try:
        fit(trainer, module, datamodule, cfg, run_dir)  # or continue cfg.resume; exits 143/130 on SIGTERM/SIGINT
    finally:  # also after a failure or an interrupt: the epochs that did finish are worth a look
        _write_curves(trainer, run_dir, cfg)

    ckpt = trainer.checkpoint_callback if splits.val else None  # without validation the first one is last.ckpt
    best_path = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    best_score = float(ckpt.best_model_score) if ckpt is not None and ckpt.best_model_score is not None else None
    last = run_dir / CHECKPOINT_DIR / "last.ckpt"

    def best_or_last(key: str) -> float | None:  # the best checkpoint's value if `key` chose it, else the last
        return best_score if key == cfg.callbacks.monitor and best_score is not None else _metric(trainer, key)

    summary: dict[str, Any] = {
        "name": cfg.name,
        "val_acc": best_or_last("val/acc"),
        "test_acc": None,
        "epochs": int(trainer.current_epoch),
        "best_checkpoint": best_path,
        "last_checkpoint": str(last) if last.is_file() else None,
        "test_checkpoint": None,
        "run_dir": str(run_dir),
        "num_classes": len(splits.class_names),
        "class_names": list(splits.class_names),
        "train_size": len(splits.train),
        "val_size": len(splits.val),
        "test_size": len(splits.test),
        "feature_cache": run.feature_cache,
        "batch_size": int(datamodule.batch_size),  # trainer.auto_batch_size may have changed data.batch_size
        "bad_images": len(images.bad_images),
    }
    if cfg.task == "multilabel":  # acc is the exact-match rate there; mAP is the headline
        summary.update(task=cfg.task, val_mAP=best_or_last("val/mAP"), val_f1=best_or_last("val/f1"), test_mAP=None)
    if splits.test:
        summary["test_checkpoint"] = _test_checkpoint(cfg, best_path, last)
        trainer.test(module, datamodule=datamodule, ckpt_path=summary["test_checkpoint"], verbose=False)
        summary["test_acc"] = _metric(trainer, "test/acc")
        if cfg.task == "multilabel":
            summary["test_mAP"] = _metric(trainer, "test/mAP")
    summary["wall_time_s"] = round(time.time() - started, 1)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary
