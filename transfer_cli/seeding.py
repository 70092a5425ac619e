"""Randomness as a function of named positions: one scheme for every seed the tool derives.

A resumed run must replay exactly what an uninterrupted one does, whatever ran before the interruption. So no
random draw depends on an RNG's history: the order of epoch e, the augmentation of image i in epoch e, the
random ops of training batch b and the cached view k of image i each get a generator (or a seed) mixed from
(seed, position..., stream) by numpy's SeedSequence, under which neighbouring tuples give unrelated streams.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np

# One stream per use, so two uses of the same (seed, position) never share draws.
SHUFFLE = None  # the epoch permutation: mixed from (seed, epoch) alone, as it always was
BALANCED = 1  # class-balanced draws of an epoch
AUGMENT = 2  # the augmentation of one training image in one epoch
STEP = 3  # dropout, stochastic depth and mixup in one training batch
VIEW = 4  # a cached augmented view of one image


def _entropy(parts: tuple[int, ...], stream: int | None) -> list[int]:
    return [int(p) % 2**64 for p in parts] + ([] if stream is None else [int(stream)])


def numpy_rng(*parts: int, stream: int | None) -> np.random.Generator:
    """A numpy generator for (parts..., stream)."""
    return np.random.default_rng(_entropy(parts, stream))


def derived_seed(*parts: int, stream: int | None) -> int:
    """A 63-bit seed for (parts..., stream), for torch.manual_seed and friends."""
    state = np.random.SeedSequence(_entropy(parts, stream)).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def seed_globals(value: int) -> None:
    """Seed torch's CPU generator and those of the accelerators in use, numpy's and Python's global RNGs.

    Called before every training batch, so it stays cheap: `torch.manual_seed` would also queue a seed for every
    accelerator type not initialised in this process (CUDA, XPU, MTIA), formatting the call stack each time (about
    0.8 ms per call on a 2-core CPU, deep in Lightning's stack). An accelerator in use is initialised before the
    first batch; one that is not has no random state a step could draw from.
    """
    import torch

    torch.default_generator.manual_seed(value)
    for name in ("cuda", "xpu", "mtia"):
        backend = getattr(torch, name, None)
        if backend is not None and backend.is_initialized():
            backend.manual_seed_all(value)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


@contextlib.contextmanager
def torch_seeded(value: int) -> Iterator[None]:
    """torch's CPU RNG seeded with `value` inside, and restored afterwards, so callers' draws are untouched.

    Only the CPU generator: the transforms seeded this way draw their parameters there, and seeding the
    accelerators (torch.manual_seed) would change their state outside this block."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(value)
        yield


__all__ = ["numpy_rng", "derived_seed", "seed_globals", "torch_seeded", "SHUFFLE", "BALANCED", "AUGMENT", "STEP",
           "VIEW"]
