"""callbacks.ema: an exponential moving average of the weights, from Lightning's own EMAWeightAveraging.

Lightning's callback keeps the average in a torch AveragedModel updated after every optimizer step, swaps it in
for each validation (so checkpoint selection and early stopping judge the EMA weights), and copies it into the
model when training ends. Checkpoints hold both, as plain tensors: `state_dict` the EMA weights (what evaluation
and export load), `current_model_state` the raw ones, `averaging_state` the update count.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.trainer.states import TrainerFn

RAW_WEIGHTS_KEY = "current_model_state"  # Lightning's name for the raw weights inside a checkpoint


class EMA(EMAWeightAveraging):
    """EMAWeightAveraging whose testing of a checkpoint tests its EMA weights.

    `device`: where the average lives, the training device (Lightning builds the average before the model moves
    to the accelerator, so by default it would stay on the CPU and every update would copy the weights across).
    """

    def __init__(self, decay: float, device: torch.device | str | None = None):
        super().__init__(device=device, decay=decay)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning's callback restores the raw weights into the model whenever a checkpoint has them, which is
        # right for resuming a fit but would make `trainer.test(ckpt_path=best)` after fit test the raw weights.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
