"""The training sampler chosen by data.sampler: a plain shuffle, or class-balanced draws.

Both are functions of (seed, epoch) only, like EpochShuffleSampler: resuming at epoch k replays epoch k's draws,
whatever else consumed random numbers before.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from transfer_cli.errors import TransferError


class BalancedEpochSampler(Sampler[int]):
    """Draws len(labels) indices with replacement, each class equally likely (as WeightedRandomSampler with
    weights 1 / class count), from a generator seeded by (seed, epoch)."""

    _STREAM = 1  # keeps these draws apart from EpochShuffleSampler's permutation of the same (seed, epoch)

    def __init__(self, labels: Sequence[int], seed: int):
        self.labels = np.asarray(labels, dtype=np.int64)
        counts = Counter(self.labels.tolist())
        weights = np.array([1.0 / counts[label] for label in self.labels.tolist()])
        self.probabilities = weights / weights.sum()
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every training epoch
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed % 2**64, self.epoch, self._STREAM])
        return iter(rng.choice(len(self.labels), size=len(self.labels), replace=True, p=self.probabilities).tolist())

    def __len__(self) -> int:
        return len(self.labels)


def train_sampler(kind: str, labels: Sequence[Any], seed: int) -> Sampler[int]:
    """data.sampler = shuffle | balanced, over training samples with these labels (class indices)."""
    from transfer_cli.data.datamodule import EpochShuffleSampler

    if kind == "shuffle":
        return EpochShuffleSampler(len(labels), seed)
    if kind == "balanced":
        if any(not isinstance(label, (int, np.integer)) for label in labels):
            raise TransferError(
                "data.sampler=balanced draws classes equally often; samples with label sets have no single class",
                "data.sampler=shuffle",
            )
        return BalancedEpochSampler([int(label) for label in labels], seed)
    raise TransferError(f"unknown data.sampler={kind}", "data.sampler=shuffle or data.sampler=balanced")
