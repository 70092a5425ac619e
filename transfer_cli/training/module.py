"""The LightningModule: loss, metrics, optimizer and schedule around a Classifier."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from transfer_cli.lifecycle.run_state import FINGERPRINT_KEY, fingerprint, follow_schedule
from transfer_cli.models.classifier import Classifier
from transfer_cli.training.audit import audit_rows, check_consistency, print_audit, write_audit
from transfer_cli.training.freezing import apply_freeze
from transfer_cli.training.losses import build_criterion
from transfer_cli.training.metrics import build_metrics
from transfer_cli.training.mixing import build_mixup, mix_batch
from transfer_cli.training.optim import build_optimizer
from transfer_cli.training.param_groups import param_groups
from transfer_cli.training.schedules import lightning_schedulers, run_length
from transfer_cli.training.tta import tta_logits

CHECKPOINT_KEY = "transfer"  # our plain-data block inside every Lightning checkpoint
log = logging.getLogger("transfer_cli")


class TransferModule(pl.LightningModule):
    """Trains `model` on image batches, or only its head on precomputed backbone features (`inputs="features"`).

    `cfg` is the composed run config; it goes into every checkpoint as plain data, with `meta` (class names,
    preprocessing), so eval/predict/export need nothing else.
    """

    def __init__(self, model: Classifier, cfg: DictConfig, meta: dict, inputs: str = "images",
                 class_counts: list[int] | None = None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.meta = meta
        self.inputs = inputs
        # Speed only, for image batches (a head on features has no convolutions): channels_last is the layout
        # cuDNN and oneDNN convolutions run fastest in; nn.Module.compile keeps the state-dict keys unchanged.
        self.channels_last = inputs == "images" and bool(OmegaConf.select(cfg, "trainer.channels_last", default=False))
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if inputs == "images" and OmegaConf.select(cfg, "trainer.compile", default=False):
            model.compile()
        num_classes = len(meta["class_names"])
        self.criterion = build_criterion(cfg, num_classes, class_counts)
        self.metrics = build_metrics(cfg, num_classes)
        self.mixup = build_mixup(cfg.augmentation, num_classes)
        if self.mixup is not None and inputs != "images":
            log.warning("mixup/cutmix ignored: the head trains on cached backbone features, not on images "
                        "(to mix images: transfer.cache_features=false)")
            self.mixup = None
        # eval.tta: averaged logits over views of each validation/test image (training/tta.py)
        self.tta = cfg.eval if OmegaConf.select(cfg, "eval.tta", default="none") != "none" else None
        if self.tta is not None and inputs != "images":
            log.warning("eval.tta=%s ignored: the head is evaluated on cached backbone features, not on images "
                        "(for TTA: transfer.cache_features=false)", self.tta.tta)
            self.tta = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor | None:
        inputs, target = batch
        if len(target) == 0:  # every image of the batch was unreadable: nothing to learn from, skip the step
            return None
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        if self.inputs == "features":
            logits = self.model.head(inputs)
        elif stage != "train" and self.tta is not None:
            logits = tta_logits(self.model, inputs, self.tta)
        else:
            logits = self.model(inputs)
        loss = self.criterion(logits, target)
        metrics = self.metrics[f"{stage}_metrics"]
        # Mixed batches have soft targets: train accuracy counts each mix's dominant label, so train/acc stays
        # logged and comparable between epochs (it reads lower than on clean images, by construction).
        metrics(logits, target.argmax(dim=-1) if stage == "train" and self.mixup is not None else target)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(target))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(target))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.mixup is not None:
            batch = mix_batch(self.mixup, *batch)
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    # The freeze state is re-derived from (epoch, config) at fit start and every epoch start, never carried over.
    def on_fit_start(self) -> None:
        apply_freeze(self.model, self.cfg.transfer, self.current_epoch)
        self._audited: frozenset | None = None

    def on_train_epoch_start(self) -> None:
        trainable = frozenset(apply_freeze(self.model, self.cfg.transfer, self.current_epoch))
        if trainable != getattr(self, "_audited", None):  # the first epoch of this fit, and each milestone
            self._audit(trainable)

    def _audit(self, trainable: frozenset) -> None:
        optimizer = self.optimizers(use_pl_optimizer=False)
        check_consistency(self.model, optimizer, set(trainable))
        self._audited = trainable
        if self.trainer.is_global_zero:
            rows = audit_rows(self.model, optimizer)
            print_audit(rows, self.current_epoch)
            entry = {"epoch": self.current_epoch, "step": self.global_step, "stages": rows}
            write_audit(Path(self.trainer.default_root_dir) / "audit.json", entry)

    def configure_optimizers(self) -> tuple[list, list]:
        opt_cfg, cb = self.cfg.optimizer, self.cfg.callbacks
        optimizer = build_optimizer(param_groups(self.model, self.cfg.transfer, opt_cfg), opt_cfg)
        # A metric that only exists every k-th epoch must not stop the plateau schedule in the others.
        strict = (self.trainer.check_val_every_n_epoch or 1) == 1
        schedulers = lightning_schedulers(optimizer, self.cfg.scheduler, run_length(self.trainer), cb.monitor,
                                          cb.mode, strict=strict)
        return [optimizer], schedulers

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path:  # resumed: the LR follows the schedule of the config as it is now
            follow_schedule(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        config = OmegaConf.to_container(self.cfg, resolve=True)
        # The fingerprint (backbone, classes, task) is what a resume checks the data and model against.
        checkpoint[CHECKPOINT_KEY] = {"config": config, **self.meta, FINGERPRINT_KEY: fingerprint(self.meta)}

