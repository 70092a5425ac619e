"""callbacks.swa: stochastic weight averaging (Izmailov et al., UAI 2018), the uniform mean of the weights at the end
of each epoch from epoch floor(callbacks.swa_start * trainer.max_epochs) on, on Lightning's WeightAveraging.

Lightning's StochasticWeightAveraging callback does not fit this trainer, and config/checks.py refuses it as an
extra callback: it replaces the run's LR schedule by its own SWALR from the averaging start (here the LR is the
schedule's function of the step, which resume and extension rely on), it adds a training epoch to recompute
BatchNorm statistics, and validation, best.ckpt and the end-of-run test see the raw weights, so the average reaches
only last.ckpt. Here, as callbacks.ema: the LR follows the run's own schedule (scheduler=constant gives SWA's
constant LR, cosine averages the tail of a decay); once averaging has begun, validation (so checkpoint selection)
judges the average, checkpoints hold it as `state_dict` and the raw weights as `current_model_state`, and a resumed
run continues both (Lightning's WeightAveraging checkpoint format). BatchNorm running statistics are averaged with
the weights (AveragedModel's use_buffers), not recomputed by an extra pass over the training images.

Updates happen at each epoch's last training batch, before that epoch's validation, so validation judges the mean
including that epoch (an update at Lightning's epoch end would come after it). Before the first update the callback
stays out of the way: validation and checkpoints see the raw weights.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.trainer.states import TrainerFn


class SWA(WeightAveraging):
    def __init__(self, start: float, device: torch.device | str | None = None):
        super().__init__(device=device, use_buffers=True)  # no avg_fn: AveragedModel's uniform mean
        self.start = float(start)
        self._updates = 0  # the AveragedModel's n_averaged, mirrored on the host

    def start_epoch(self, trainer: pl.Trainer) -> int:
        epochs = int(trainer.max_epochs or 1)
        return min(int(math.floor(self.start * epochs)), max(epochs - 1, 0))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        last = batch_idx + 1 == trainer.num_training_batches  # batch_idx counts from the epoch's start, resumed too
        if last and trainer.current_epoch >= self.start_epoch(trainer) and trainer.global_step > self._latest_update_step:
            assert self._average_model is not None
            self._average_model.update_parameters(pl_module)
            self._latest_update_step = trainer.global_step
            self._updates += 1

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._updates:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._updates:
            super().on_validation_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._updates:
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
                           ) -> None:
        if self._updates:  # before the first update the checkpoint is a plain one
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
                           ) -> None:
        # Only a resumed fit restores the average (the end-of-run test loads `state_dict`, the average, and is done).
        if trainer.state.fn != TrainerFn.FITTING or "current_model_state" not in checkpoint:
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        assert self._average_model is not None
        self._updates = int(self._average_model.n_averaged)


__all__ = ["SWA"]
