"""The LightningModule: loss, metrics, optimizer and schedule around a Classifier."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from transfer_cli.models.classifier import Classifier
from transfer_cli.training.freezing import apply_freeze
from transfer_cli.training.losses import build_criterion
from transfer_cli.training.metrics import build_metrics
from transfer_cli.training.optim import build_optimizer
from transfer_cli.training.param_groups import param_groups
from transfer_cli.training.schedules import build_scheduler

CHECKPOINT_KEY = "transfer"  # our plain-data block inside every Lightning checkpoint


class TransferModule(pl.LightningModule):
    """Trains `model` on image batches, or only its head on precomputed backbone features (`inputs="features"`).

    `cfg` is the composed run config; it goes into every checkpoint as plain data, with `meta` (class names,
    preprocessing), so eval/predict/export need nothing else.
    """

    def __init__(self, model: Classifier, cfg: DictConfig, meta: dict, inputs: str = "images"):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.meta = meta
        self.inputs = inputs
        num_classes = len(meta["class_names"])
        self.criterion = build_criterion(cfg, num_classes)
        self.metrics = build_metrics(cfg, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor | None:
        inputs, target = batch
        if len(target) == 0:  # every image of the batch was unreadable: nothing to learn from, skip the step
            return None
        logits = self.model.head(inputs) if self.inputs == "features" else self.model(inputs)
        loss = self.criterion(logits, target)
        metrics = self.metrics[f"{stage}_metrics"]
        metrics(logits, target)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(target))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(target))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    # The freeze state is re-derived from (epoch, config) at fit start and every epoch start, never carried over.
    def on_fit_start(self) -> None:
        apply_freeze(self.model, self.cfg.transfer, self.current_epoch)

    def on_train_epoch_start(self) -> None:
        apply_freeze(self.model, self.cfg.transfer, self.current_epoch)

    def configure_optimizers(self) -> dict:
        opt_cfg, sched_cfg = self.cfg.optimizer, self.cfg.scheduler
        optimizer = build_optimizer(param_groups(self.model, self.cfg.transfer, opt_cfg), opt_cfg)
        total_steps = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        scheduler = build_scheduler(optimizer, sched_cfg, steps_per_epoch, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        config = OmegaConf.to_container(self.cfg, resolve=True)
        checkpoint[CHECKPOINT_KEY] = {"config": config, **self.meta}

