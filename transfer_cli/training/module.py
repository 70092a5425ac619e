"""The LightningModule: one training step around a Classifier, given every piece it uses.

Everything here is built elsewhere from the config (transfer_cli/assembly/module.py) and handed over as
objects: the loss, the metrics, how to make the optimizer and the LR schedule, which parameters train in each
epoch, test-time augmentation and batch mixing. The module itself reads no config.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MetricCollection

from transfer_cli.models.classifier import Classifier
from transfer_cli.resume.checkpoints import CHECKPOINT_KEY
from transfer_cli.training.audit import adapted_layers, audit_rows, check_consistency, print_audit, write_audit
from transfer_cli.training.epoch_state import KEY as EPOCH_KEY
from transfer_cli.training.epoch_state import EpochState
from transfer_cli.training.finite import FiniteWatch, check_weights
from transfer_cli.training.freezing import FreezePlan
from transfer_cli.training.mixing import mix_batch
from transfer_cli.training.schedules import LRSchedule
from transfer_cli.run_files import RunLayout

if TYPE_CHECKING:
    from pytorch_lightning.utilities.types import OptimizerLRScheduler

log = logging.getLogger("transfer_cli")


class TransferModule(pl.LightningModule):
    """Trains `model` on image batches, or only its head on precomputed backbone features (`inputs="features"`).

    `checkpoint_block`: plain data (the resolved config, class names, preprocessing, the fingerprint) written
    into every checkpoint, so eval/predict/export need nothing else.
    """

    # The transfer mode's plan shadows LightningModule.freeze(), Lightning's helper to freeze the whole module,
    # which nothing here calls (the plan decides what trains); `module.freeze` is the plan for its users.
    freeze: FreezePlan  # type: ignore[assignment]

    def __init__(self, model: Classifier, *, criterion: Callable, metrics: nn.ModuleDict,
                 optimizer: Callable[[Classifier], torch.optim.Optimizer], schedule: LRSchedule, freeze: FreezePlan,
                 tta: Optional[Callable] = None, mixing: Any = None, inputs: str = "images",
                 channels_last: bool = False, checkpoint_block: Optional[dict] = None):
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.metrics = metrics
        self.make_optimizer = optimizer
        self.schedule = schedule
        self.freeze = freeze
        self.tta = tta
        self.mixup = mixing
        self.inputs = inputs
        self.channels_last = channels_last
        self.checkpoint_block = checkpoint_block or {}
        self.finite = FiniteWatch()
        self.epoch = EpochState(self._metrics("train"))  # the training epoch's loss and metrics so far
        self._audited: Optional[frozenset] = None

    def _metrics(self, stage: str) -> MetricCollection:
        metrics = self.metrics[f"{stage}_metrics"]
        assert isinstance(metrics, MetricCollection)  # a ModuleDict holds any Module; metrics.py builds these
        return metrics

    @property
    def meta(self) -> dict:
        return self.checkpoint_block

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def eval_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The logits validation and test score: the head alone on cached features, else the network with
        eval.tta (calibration reuses them, so it fits what validation measured)."""
        if self.inputs == "features":
            return self.model.head(inputs)
        return self.tta(self.model, inputs) if self.tta is not None else self.model(inputs)

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor | None:
        inputs, target = batch
        if len(target) == 0:  # every image of the batch was unreadable: nothing to learn from, skip the step
            return None
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        logits = self.model(inputs) if stage == "train" and self.inputs != "features" else self.eval_logits(inputs)
        loss = self.criterion(logits, target)
        # Mixed batches have soft targets: train accuracy counts each mix's dominant label, so train/acc stays
        # logged and comparable between epochs (it reads lower than on clean images, by construction).
        labels = target.argmax(dim=-1) if stage == "train" and self.mixup is not None else target
        # update, not forward: forward would also compute each batch's own value, which nothing reads. The
        # metrics are logged once, at the stage's epoch end (_log_metrics).
        self._metrics(stage).update(logits.detach(), labels)
        # The step loss stays out of Lightning's progress-bar dict: Lightning turns what is there into Python
        # floats after every batch, a device sync per step on a GPU. The bar shows it anyway, read at its own
        # refresh rate (tracking/progress.py).
        if stage == "train":  # the epoch's mean is logged at its end, from what EpochState kept (also across a resume)
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=False, batch_size=len(target))
            self.epoch.add(loss, len(target))
        else:
            self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(target))
        return loss

    def _log_metrics(self, stage: str) -> None:
        metrics = self._metrics(stage)
        if any(metric.update_called for metric in metrics.values()):  # no batch: nothing to report
            self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True)

    def on_train_epoch_end(self) -> None:
        self.finite.check(self.current_epoch)
        mean = self.epoch.mean_loss()
        if mean is not None:
            self.log("train/loss_epoch", mean, on_step=False, on_epoch=True)
        self._log_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.mixup is not None:
            batch = mix_batch(self.mixup, *batch)
        loss = self._shared_step(batch, "train")
        if loss is not None:
            self.finite.observe(loss, self.global_step)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Read where Lightning syncs anyway (it logs every log_every_n_steps steps): no extra wait per step.
        # Lightning's logger connector sets trainer.log_every_n_steps at init; the Trainer class does not declare it.
        every = max(1, self.trainer.log_every_n_steps)  # type: ignore[attr-defined]
        if (self.global_step + 1) % every == 0:
            self.finite.check(self.current_epoch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    # The freeze state is re-derived from (epoch, config), never carried over: at fit start (for the sanity
    # check), at train start, and at every epoch start. Train start matters for a resumed run: Lightning calls
    # on_fit_start before it restores the epoch, and skips on_train_epoch_start for an epoch it restarts in the
    # middle, so train start is the one hook that sees the restored epoch before its first batch.
    def on_fit_start(self) -> None:
        self.freeze.apply(self.model, self.current_epoch)
        self._audited = None

    def _apply_freeze(self) -> None:
        trainable = frozenset(self.freeze.apply(self.model, self.current_epoch))
        if trainable != self._audited:  # the first epoch of this fit, and each milestone
            self._audit(trainable)

    def on_train_epoch_start(self) -> None:
        self.epoch.reset()
        self._apply_freeze()

    def _audit(self, trainable: frozenset) -> None:
        optimizer = self.optimizers(use_pl_optimizer=False)
        assert isinstance(optimizer, torch.optim.Optimizer)  # configure_optimizers returns one optimizer
        check_consistency(self.model, optimizer, set(trainable))
        self._audited = trainable
        if self.trainer.is_global_zero:
            rows = audit_rows(self.model, optimizer)
            print_audit(rows, self.current_epoch)
            entry = {"epoch": self.current_epoch, "step": self.global_step, "stages": rows}
            layers = adapted_layers(self.model.backbone)
            if layers:  # transfer=lora: which layers carry an adapter (transfer.lora_targets matches these names)
                entry["adapted_layers"] = layers
            write_audit(RunLayout(Path(self.trainer.default_root_dir)).audit, entry)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        optimizer = self.make_optimizer(self.model)
        # A metric that only exists every k-th epoch must not stop the plateau schedule in the others.
        strict = (self.trainer.check_val_every_n_epoch or 1) == 1
        # Lightning documents "two lists: optimizers, and LR schedulers or lr_scheduler_config dicts", but its
        # OptimizerLRScheduler types the second list's configs as its LRSchedulerConfig dataclass only.
        return [optimizer], self.schedule.configs(optimizer, strict=strict)  # type: ignore[return-value]

    def on_train_start(self) -> None:
        # The run's length is known now (and a resume has restored its step): the LR follows the schedule of the
        # config as it is now, also when trainer.max_epochs was extended.
        self.schedule.start(self.trainer)
        self.epoch.apply(self.current_epoch, self.device)  # a run restored in the middle of an epoch continues it
        self._apply_freeze()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Never a best.ckpt or last.ckpt of a diverged run: raising here stops the run before the file is written.
        self.finite.check(self.current_epoch)
        check_weights(checkpoint["state_dict"], f"the model at step {self.global_step}")
        checkpoint[CHECKPOINT_KEY] = self.checkpoint_block
        under_way = self.epoch.saved(self.current_epoch, self.trainer.num_training_batches)
        if under_way is not None:
            checkpoint[EPOCH_KEY] = under_way

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.epoch.restore_later(checkpoint.get(EPOCH_KEY))
