"""callbacks.ema: an exponential moving average of the weights, from Lightning's own EMAWeightAveraging.

Lightning's callback keeps the average in a torch AveragedModel updated after every optimizer step, swaps it in
for each validation (so checkpoint selection and early stopping judge the EMA weights), and copies it into the
model when training ends. Checkpoints hold both, as plain tensors: `state_dict` the EMA weights (what evaluation
and export load), `current_model_state` the raw ones, `averaging_state` the update count.

The per-step update is ours: AveragedModel.update_parameters applies the average tensor by tensor and reads its
update counter, which lives on the training device, twice per step (`n_averaged == 0`, `n_averaged > 0`): two
host syncs and ~7 ms of host time per step for a small EfficientNet on a CPU. Here the update is torch's
`get_ema_multi_avg_fn` (one foreach lerp over all floating tensors) on tensor lists gathered once per fit, and
the counter is mirrored in Python. The result is the same average (same order: the first update copies the
weights, each later one moves the average by (1 - decay) towards them; integer buffers are averaged as torch's
own EMA function does), kept in Lightning's AveragedModel, so swapping, saving and loading stay Lightning's.
That uses attributes private to Lightning's callback (`_average_model`, `_latest_update_step`/`_epoch`); this module
is their only user, and tests/test_recipe.py's EMA tests fail if they change.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.trainer.states import TrainerFn
from torch.optim.swa_utils import get_ema_multi_avg_fn

RAW_WEIGHTS_KEY = "current_model_state"  # Lightning's name for the raw weights inside a checkpoint


class EMA(EMAWeightAveraging):
    """EMAWeightAveraging whose testing of a checkpoint tests its EMA weights, updated without host syncs.

    `device`: where the average lives, the training device (Lightning builds the average before the model moves
    to the accelerator, so by default it would stay on the CPU and every update would copy the weights across).
    """

    def __init__(self, decay: float, device: torch.device | str | None = None):
        super().__init__(device=device, decay=decay)
        self.decay = float(decay)
        self._lerp = get_ema_multi_avg_fn(self.decay)
        self._pairs: Optional[tuple[list, list, list, list]] = None  # averaged/current: floating, other
        self._updates = 0  # mirrors the AveragedModel's n_averaged, on the host

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._pairs = None  # a new AveragedModel, and the module may have moved: gather the tensors again

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # As WeightAveraging.on_train_batch_end, with our update.
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            self._update(pl_module)
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # As WeightAveraging.on_train_epoch_end (which updates only with update_starting_at_epoch, not set here).
        if trainer.current_epoch > self._latest_update_epoch and self.should_update(epoch_idx=trainer.current_epoch):
            self._update(pl_module)
            self._latest_update_epoch = trainer.current_epoch

    def _gather(self, pl_module: pl.LightningModule) -> tuple[list, list, list, list]:
        average = self._average_model
        assert average is not None
        # AveragedModel's own order: parameters, then buffers (use_buffers=True, Lightning's default)
        pairs = zip(itertools.chain(average.module.parameters(), average.module.buffers()),
                    itertools.chain(pl_module.parameters(), pl_module.buffers()))
        floating: tuple[list, list] = ([], [])
        other: tuple[list, list] = ([], [])
        for averaged, current in pairs:
            group = floating if averaged.is_floating_point() else other
            group[0].append(averaged.detach())
            group[1].append(current.detach())
        self._updates = int(average.n_averaged)  # once per fit: a restored checkpoint's count
        return floating[0], floating[1], other[0], other[1]

    @torch.no_grad()
    def _update(self, pl_module: pl.LightningModule) -> None:
        if self._pairs is None:
            self._pairs = self._gather(pl_module)
        averaged, current, averaged_other, current_other = self._pairs
        if self._updates == 0:
            for average, value in zip(averaged + averaged_other, current + current_other):
                average.copy_(value)
        else:
            if averaged:
                self._lerp(averaged, current, None)
            for average, value in zip(averaged_other, current_other):  # e.g. BatchNorm's num_batches_tracked
                average.copy_(average * self.decay + value * (1 - self.decay))
        assert self._average_model is not None  # Lightning's setup built it; _gather found it
        self._average_model.n_averaged += 1  # on the device: no sync
        self._updates += 1

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning's callback restores the raw weights into the model whenever a checkpoint has them, which is
        # right for resuming a fit but would make `trainer.test(ckpt_path=best)` after fit test the raw weights.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
            self._pairs = None  # the restored count is read again at the next update
