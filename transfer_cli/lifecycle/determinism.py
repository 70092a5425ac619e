"""Randomness as a function of (seed, epoch, position), so a resumed run replays exactly what an uninterrupted one does.

Three sources of randomness would otherwise depend on everything that ran before an interruption:
- the augmentation of each training image: worker processes draw crops and flips from RNGs seeded once per
  worker start (or from the main process's RNG with num_workers=0), so their state after k epochs is history;
- the main process's RNGs during a training step (dropout, stochastic depth, mixup's numpy draws);
- the data order inside an interrupted epoch: Lightning restores its batch counter but the loader starts over.
Here image i of epoch e is augmented under a seed derived from (seed, e, i); every training batch starts from
RNGs seeded by (seed, epoch, batch index, rank); and a resumed epoch's sampler skips the batches already trained.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset, Sampler

_AUGMENT_STREAM = 2  # apart from the samplers' streams (0: shuffle, 1: balanced) of the same (seed, epoch)
_STEP_STREAM = 3


def derived_seed(*parts: int) -> int:
    """A 63-bit seed mixed from the parts by SeedSequence: neighbouring tuples give unrelated seeds."""
    state = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


class EpochIndexSampler(Sampler):
    """Wraps a training sampler: yields (epoch, index) keys for EpochSeededDataset, and can skip the first
    `count` indices of one epoch (the batches trained before the run was interrupted)."""

    def __init__(self, base: Sampler[int]):
        self.base = base
        self.epoch = 0
        self._skip: Optional[tuple[int, int]] = None  # (epoch, indices to skip in it)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every training epoch
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def skip_in_epoch(self, epoch: int, count: int) -> None:
        self._skip = (int(epoch), int(count)) if count > 0 else None

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        skip = self._skip[1] if self._skip is not None and self._skip[0] == epoch else 0
        for position, index in enumerate(self.base):
            if position >= skip:
                yield epoch, int(index)

    def __len__(self) -> int:  # the full epoch: Lightning counts a resumed epoch's batches from where it stopped
        return len(self.base)  # type: ignore[arg-type]


class EpochSeededDataset(Dataset):
    """`dataset[index]` for a key (epoch, index), with torch's RNG seeded from (seed, epoch, index) while the
    transforms run (and restored afterwards), whichever process or worker loads it."""

    def __init__(self, dataset: Any, seed: int):
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (tuple, list)):
            epoch, index = key
        else:  # an (unwrapped) integer index, e.g. from code that iterates the dataset itself
            epoch, index = 0, key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, epoch, index, _AUGMENT_STREAM))
            return self.dataset[int(index)]


def seed_step(seed: int, epoch: int, batch_idx: int, rank: int = 0) -> None:
    """Seed torch (all devices), numpy's and Python's global RNGs for one training batch."""
    value = derived_seed(seed, epoch, batch_idx, rank, _STEP_STREAM)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


class SeedEveryBatch(pl.Callback):
    """Before each training batch, seed the global RNGs from (seed, epoch, batch index, rank): dropout, stochastic
    depth and mixup then draw the same numbers in a resumed run as in an uninterrupted one."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        seed_step(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank)


class RebuildLoaderOnResume(pl.Callback):
    """On resume, build the train loader again once Lightning has restored its loop counters.

    Lightning builds it earlier, while configure_optimizers asks for trainer.estimated_stepping_batches (the LR
    schedule's length), before the checkpoint's counters are loaded; with worker processes that first iterator
    has even drawn its indices already. Rebuilt here, the sampler gets the restored epoch and skips the batches
    the interrupted epoch trained on.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.ckpt_path:
            return
        fit = trainer.fit_loop
        if fit._data_fetcher is not None:  # stop the stale iterator's workers
            fit._data_fetcher.teardown()
        fit._combined_loader = None  # Lightning has no public "rebuild the train loader now"
        fit.setup_data()


def batches_to_skip(trainer: Optional[pl.Trainer], num_batches: int) -> tuple[int, int]:
    """(epoch, batches) of the training epoch a restored run stopped in the middle of; (0, 0) otherwise.

    Read when the train loader is built, after Lightning restored its loop counters from the checkpoint.
    """
    if trainer is None:
        return 0, 0
    fit = trainer.fit_loop
    if not fit.restarting:
        return 0, 0
    epoch = fit.epoch_progress.current
    done = int(fit.epoch_loop.batch_progress.current.processed)  # batches whose optimizer step has run
    if epoch.processed < epoch.started and 0 < done < num_batches:
        return int(epoch.processed), done
    return 0, 0


def place_sampler(sampler: Any, trainer: Optional[pl.Trainer], loader_len: int, batch_size: int) -> None:
    """Put a new train loader's sampler where the trainer is: its epoch (Lightning sets it only at the next epoch
    start, after worker processes may have drawn indices already) and, mid-epoch, past the batches trained."""
    if not isinstance(sampler, EpochIndexSampler) or trainer is None:
        return
    sampler.set_epoch(int(trainer.fit_loop.epoch_progress.current.processed))
    epoch, done = batches_to_skip(trainer, loader_len)
    sampler.skip_in_epoch(epoch, done * batch_size)


__all__ = ["EpochIndexSampler", "EpochSeededDataset", "SeedEveryBatch", "RebuildLoaderOnResume", "seed_step", "derived_seed",
           "batches_to_skip", "place_sampler"]
