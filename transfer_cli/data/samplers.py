"""Training samplers whose draws are a function of (seed, epoch) only, and the wrappers resuming needs.

Every epoch's order (or class-balanced draws) comes from a generator seeded by (seed, epoch), so resuming at
epoch k replays epoch k's order whatever else consumed random numbers before. Lightning calls `set_epoch` at
the start of every training epoch; the wrappers pass it on to the sampler they wrap.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Sampler

from transfer_cli import seeding
from transfer_cli.errors import TransferError


class EpochSampler(Sampler):
    """A sampler that knows which epoch it is drawing for."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every training epoch
        self.epoch = int(epoch)


class EpochShuffleSampler(EpochSampler):
    """A permutation of the samples that depends on (seed, epoch) only."""

    def __init__(self, num_samples: int, seed: int):
        super().__init__()
        self.num_samples = num_samples
        self.seed = int(seed)

    def __iter__(self) -> Iterator[int]:
        rng = seeding.numpy_rng(self.seed, self.epoch, stream=seeding.SHUFFLE)
        return iter(rng.permutation(self.num_samples).tolist())

    def __len__(self) -> int:
        return self.num_samples


class BalancedEpochSampler(EpochSampler):
    """Draws len(labels) indices with replacement, each class equally likely (as WeightedRandomSampler with
    weights 1 / class count), from a generator seeded by (seed, epoch)."""

    def __init__(self, labels: Sequence[int], seed: int):
        super().__init__()
        self.labels = np.asarray(labels, dtype=np.int64)
        counts = Counter(self.labels.tolist())
        weights = np.array([1.0 / counts[label] for label in self.labels.tolist()])
        self.probabilities = weights / weights.sum()
        self.seed = int(seed)

    def __iter__(self) -> Iterator[int]:
        rng = seeding.numpy_rng(self.seed, self.epoch, stream=seeding.BALANCED)
        return iter(rng.choice(len(self.labels), size=len(self.labels), replace=True, p=self.probabilities).tolist())

    def __len__(self) -> int:
        return len(self.labels)


def _shuffle(labels: Sequence[Any], seed: int) -> EpochSampler:
    return EpochShuffleSampler(len(labels), seed)


def _balanced(labels: Sequence[Any], seed: int) -> EpochSampler:
    if any(not isinstance(label, (int, np.integer)) for label in labels):
        raise TransferError(
            "data.sampler=balanced draws classes equally often; samples with label sets have no single class",
            "data.sampler=shuffle",
        )
    return BalancedEpochSampler([int(label) for label in labels], seed)


# data.sampler: each image once per epoch, or classes drawn equally often
SAMPLERS: dict[str, Callable[[Sequence[Any], int], EpochSampler]] = {"shuffle": _shuffle, "balanced": _balanced}


def train_sampler(kind: str, labels: Sequence[Any], seed: int) -> EpochSampler:
    """data.sampler = `kind`, over training samples with these labels (class indices or label sets)."""
    return SAMPLERS[kind](labels, seed)


class EpochWrapper(EpochSampler):
    """A sampler over another one's draws; set_epoch reaches the wrapped sampler too."""

    def __init__(self, base: Sampler):
        super().__init__()
        self.base = base

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]


class EpochViewSampler(EpochWrapper):
    """Indices into K stacked views of the training set: epoch e draws `base`'s indices from view e % K."""

    def __init__(self, base: Sampler, num_rows: int, views: int):
        super().__init__(base)
        self.num_rows, self.views = int(num_rows), int(views)

    def __iter__(self) -> Iterator[int]:
        offset = (self.epoch % self.views) * self.num_rows
        return (offset + int(i) for i in self.base)


# (epoch, draws already trained in it) of a run restored in the middle of an epoch, asked once per iteration
ResumeStart = Callable[[], Optional[Tuple[int, int]]]


class ResumableSampler(EpochWrapper):
    """The training sampler as the loader sees it: `base`'s draws, with two things resuming needs.

    - `keys=True` yields (epoch, index) keys for a dataset that seeds each image's augmentation by them
      (data/seeded.py), since a worker process cannot know the epoch otherwise.
    - `resume_start` is asked at the start of each iteration. A run restored in the middle of an epoch answers
      (epoch, draws): this iteration is that epoch's and skips the draws already trained. It is asked when the
      iterator starts, not when the loader is built, because Lightning builds the loader before it restores the
      loop counters and sets the epoch only after the first iterator exists.
    """

    def __init__(self, base: Sampler, keys: bool = False, resume_start: Optional[ResumeStart] = None):
        super().__init__(base)
        self.keys = keys
        self.resume_start = resume_start

    def __iter__(self) -> Iterator[Any]:
        skip = 0
        start = self.resume_start() if self.resume_start is not None else None
        if start is not None:
            epoch, skip = start
            self.set_epoch(epoch)
        epoch = self.epoch
        for position, index in enumerate(self.base):
            if position >= skip:
                yield (epoch, int(index)) if self.keys else int(index)


__all__ = ["EpochSampler", "EpochShuffleSampler", "BalancedEpochSampler", "EpochViewSampler", "ResumableSampler",
           "EpochWrapper", "SAMPLERS", "train_sampler", "ResumeStart"]
