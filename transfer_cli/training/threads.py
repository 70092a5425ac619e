"""One CPU thread for work too small to share: a linear probe's solve, a head trained on cached features.

torch splits each matrix product over its intra-op threads. When a product takes milliseconds, the threads spend
more time meeting than working, and far more when other processes hold the cores: on a busy 2-core machine (load
~3.4), 50 L-BFGS iterations of a probe took, with 1 vs 2 threads, 0.05 vs 0.36 s at 2e6 multiply-adds per pass
(the demo: 1,575 x 1,280 features, two classes), 0.38 vs 1.36 s at 6.4e7 and 1.0 vs 2.2 s at 2.6e8; a 30-epoch
AdamW head on the demo's features ran 6.0 vs 10.8 s. Below `ONE_THREAD_WORK` multiply-adds per pass the work
runs on one thread; larger work keeps torch's setting, where many cores do pay off.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import pytorch_lightning as pl
import torch

ONE_THREAD_WORK = 2**28


def small_work(device: torch.device, work: int) -> bool:
    """Whether `work` multiply-adds per pass on `device` run best on one thread."""
    return torch.device(device).type == "cpu" and work < ONE_THREAD_WORK


@contextlib.contextmanager
def cpu_threads_for(device: torch.device, work: int) -> Iterator[None]:
    """One intra-op thread inside, for small work on a CPU; torch's setting is restored afterwards."""
    threads = torch.get_num_threads()
    if not small_work(device, work) or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class SmallWorkThreads(pl.Callback):
    """One thread from each stage's setup to its teardown (fit, validate, test) when every step is small work:
    `work` multiply-adds per step of the module, e.g. batch x features x classes for a head on cached features."""

    def __init__(self, work: int):
        self.work = int(work)
        self._saved: Optional[int] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._saved is None and small_work(trainer.strategy.root_device, self.work):
            self._saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._saved is not None:
            torch.set_num_threads(self._saved)
            self._saved = None


__all__ = ["ONE_THREAD_WORK", "small_work", "cpu_threads_for", "SmallWorkThreads"]
