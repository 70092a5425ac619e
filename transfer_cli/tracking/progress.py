"""The training progress bar: Lightning's RichProgressBar, redrawn a few times a second rather than every batch.

Two per-batch costs of the stock bar matter on a GPU with small batches: it redraws after every batch (host time),
and what it shows is read from the device after every batch (a `.item()`, i.e. a sync that stops the host from
queueing the next step while the GPU works). Here a batch that ends less than `interval_s` after the last redraw
updates nothing, and the step loss, which the module logs outside Lightning's progress-bar dict for that reason
(training/module.py), is read only when the bar is redrawn.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar

SHOWN = ("train/loss_step", "train/loss_epoch")  # logged outside the progress-bar dict, shown here


class ThrottledProgressBar(RichProgressBar):
    """RichProgressBar redrawn at most every `interval_s` seconds while training, also showing `shown` metrics."""

    def __init__(self, interval_s: float = 0.25, shown: Sequence[str] = SHOWN, **kwargs: Any):
        super().__init__(**kwargs)
        self.interval_s = float(interval_s)
        self.shown = tuple(shown)
        self._drawn = float("-inf")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._drawn = float("-inf")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.monotonic()
        last = batch_idx + 1 >= trainer.num_training_batches
        if now - self._drawn < self.interval_s and not last:
            return
        self._drawn = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        logged = trainer.callback_metrics
        for key in self.shown:
            if key in logged:
                items[key] = float(logged[key])
        return items


__all__ = ["ThrottledProgressBar", "SHOWN"]
