"""The one DataLoader builder: training, evaluation, feature pre-passes and predictions all load through it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Sampler

from transfer_cli.errors import TransferError


def resolve_num_workers(value: Any) -> int:
    """data.num_workers: a count, or "auto": every core this process may run on but one, which the training
    process keeps. No cap: on a GPU machine, decoding and augmenting on the CPU is what limits a small model, and
    idle workers cost only their memory."""
    if str(value) == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(0, cores - 1)
    try:
        workers = int(value)
    except (TypeError, ValueError):
        workers = -1
    if workers < 0:
        raise TransferError(f"data.num_workers={value} is not a worker count", "use data.num_workers=auto or 0, 1, 2, ...")
    return workers


@dataclass(frozen=True)
class LoaderSettings:
    """How a run's images are loaded (not which): the data group's loading keys, resolved."""

    batch_size: int
    eval_batch_size: int  # no gradients kept when evaluating, so twice the training batch by default
    num_workers: int
    sampler: str  # data.sampler: a name of samplers.SAMPLERS
    seed: int  # the run's seed: data order, augmentation and worker seeds follow it
    # Every training batch of batch_size images (the last partial one dropped): a compiled network then runs one
    # graph (CUDA graphs need a fixed shape) instead of recompiling for the remainder.
    static_shapes: bool = False


def make_loader(dataset: Any, batch_size: int, *, num_workers: int = 0, seed: int = 0,
                sampler: Optional[Sampler] = None, collate_fn: Optional[Callable] = None, drop_last: bool = False,
                pin_memory: Optional[bool] = None) -> DataLoader:
    """A DataLoader in the tool's conventions: persistent workers, pinned memory when a GPU is there, and a
    generator seeded by `seed` so worker base seeds follow the run's seed, never the global RNG."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,  # order comes from the sampler (a function of seed and epoch), never from DataLoader
        drop_last=drop_last,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(int(seed)),
    )


__all__ = ["LoaderSettings", "make_loader", "resolve_num_workers"]
