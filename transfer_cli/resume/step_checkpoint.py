"""callbacks.checkpoint_every_n_steps: last.ckpt refreshed every N optimizer steps, for long epochs.

Not Lightning's ModelCheckpoint(every_n_train_steps=N): that one also saves after an epoch's last batch, before
the epoch's validation and epoch-end hooks, and a run restored from such a checkpoint goes straight to the next
epoch, so the interrupted epoch is never validated (its val/ row is missing from metrics.csv). Here the last
batch of an epoch is left to the epoch-end checkpoint, which Lightning writes after validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl


class StepCheckpoint(pl.Callback):
    def __init__(self, path: Path, every_n_steps: int):
        self.path = Path(path)
        self.every = int(every_n_steps)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        last_of_epoch = isinstance(trainer.num_training_batches, int) and batch_idx + 1 >= trainer.num_training_batches
        if trainer.global_step % self.every == 0 and not last_of_epoch and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)  # atomic (resume/checkpoint_io.py); every rank takes part


__all__ = ["StepCheckpoint"]
