"""What makes a resumed run replay the uninterrupted one: per-batch seeds, and where an interrupted epoch stopped.

Three sources of randomness would otherwise depend on everything that ran before an interruption: the data
order (data/samplers.py: a function of (seed, epoch)), each training image's augmentation (data/seeded.py: of
(seed, epoch, image)) and the random ops of a training step (dropout, stochastic depth, mixup), seeded here by
(seed, epoch, batch, rank). The fourth piece is the position inside an interrupted epoch: Lightning restores
its counters but its loader starts the epoch over, so `ResumePoint` keeps how many batches the epoch had
trained, in the checkpoint (Lightning's stateful-callback API), and the training sampler skips them.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import pytorch_lightning as pl

from transfer_cli import seeding


class SeedEveryBatch(pl.Callback):
    """Before each training batch, seed the global RNGs from (seed, epoch, batch index, rank): dropout, stochastic
    depth and mixup then draw the same numbers in a resumed run as in an uninterrupted one."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        seeding.seed_globals(seeding.derived_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank,
                                                  stream=seeding.STEP))


class ResumePoint(pl.Callback):
    """The training batches done in the current epoch, saved with every checkpoint and restored with it.

    `start()` answers the training sampler once after a restore: (epoch, batches to skip) when the checkpoint
    was written in the middle of an epoch, else (the epoch to start, 0) so the first iterator draws that epoch's
    order even though Lightning sets the sampler's epoch only after creating it.
    """

    def __init__(self) -> None:
        self.epoch: Optional[int] = None  # the epoch the count is of
        self.batches_done = 0
        self._trainer: Optional[pl.Trainer] = None
        self._restored: Optional[Tuple[int, int]] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch, self.batches_done = trainer.current_epoch, 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # batch_idx counts from the epoch's start, also in an epoch resumed in the middle
        self.epoch, self.batches_done = trainer.current_epoch, batch_idx + 1

    def state_dict(self) -> dict[str, Any]:
        # Written at an epoch's end (after Lightning counted the epoch as done, or before the next one started)
        # the count still names the epoch it is of.
        trainer = self._trainer
        total = trainer.num_training_batches if trainer is not None else -1
        epoch = self.epoch if self.epoch is not None else (trainer.current_epoch if trainer is not None else 0)
        return {"epoch": epoch, "batches_done": self.batches_done,
                "epoch_batches": total if isinstance(total, int) else -1}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        epoch, done, total = (int(state_dict.get(k, 0)) for k in ("epoch", "batches_done", "epoch_batches"))
        if 0 < done and (total < 0 or done < total):  # written in the middle of the epoch
            self._restored = (epoch, done)
        elif done > 0:  # at the epoch's end: the next one starts from its beginning
            self._restored = (epoch + 1, 0)
        else:
            self._restored = (epoch, 0)

    def start(self) -> Optional[Tuple[int, int]]:
        """(epoch, batches already trained in it), once, after a restore; None otherwise."""
        restored, self._restored = self._restored, None
        return restored


__all__ = ["SeedEveryBatch", "ResumePoint"]
