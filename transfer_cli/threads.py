"""CPU threads: one for work too small to share (a linear probe's solve, a head trained on cached features), and a
calibrated choice for a frozen backbone's pre-pass.

torch splits each matrix product over its intra-op threads. When a product takes milliseconds, the threads spend
more time meeting than working, and far more when other processes hold the cores: on a busy 2-core machine (load
~3.4), 50 L-BFGS iterations of a probe took, with 1 vs 2 threads, 0.05 vs 0.36 s at 2e6 multiply-adds per pass
(the demo: 1,575 x 1,280 features, two classes), 0.38 vs 1.36 s at 6.4e7 and 1.0 vs 2.2 s at 2.6e8; a 30-epoch
AdamW head on the demo's features ran 6.0 vs 10.8 s. Below `ONE_THREAD_WORK` multiply-adds per pass the work
runs on one thread; larger work keeps torch's setting, where many cores do pay off.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterator, Optional

import pytorch_lightning as pl
import torch

log = logging.getLogger("transfer_cli")

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


# One-thread chunks hold at most this many pixels of input (4 images at 224 x 224): EfficientNet-Lite0's largest
# activation (96 channels at 112 x 112) then stays below glibc's 32 MB ceiling for heap (not mmap) allocations.
CHUNK_PIXELS = 4 * 224 * 224


class CalibratedCpuForward:
    """A network's forward on the CPU in the faster of two ways, timed on real batches: torch's intra-op threads
    over the whole batch, or one thread over chunks of at most CHUNK_PIXELS input pixels. The first batch warms
    up (untimed), the second runs the first way, the third the second way; the faster way serves the rest.

    Why: a frozen backbone's pre-pass is the cold cost of a run, and on a small shared CPU neither way wins
    everywhere. Measured on this project's 2-core machine (EfficientNet-Lite0, 224 px, images/s; load ~3 from
    other processes): batch 64 on 2 threads 17, on 1 thread 24; one thread on batches of 16 and 4 images 38 and
    57, two threads on them 12 and 5. Large batches allocate activations of ~100 MB per layer, whose page faults
    showed up as 20 ms of system time per image at batch 64 and none at batch 4; small ones leave threads idle.
    The two ways agree up to float rounding (the order of the sums)."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor]):
        self.forward = forward
        self.calls = 0
        self.per_image: dict[str, float] = {}
        self.choice: Optional[str] = None

    def _run(self, way: str, images: torch.Tensor) -> torch.Tensor:
        if way == "threads":
            return self.forward(images)
        chunk = max(1, CHUNK_PIXELS // (images.shape[-1] * images.shape[-2]))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return torch.cat([self.forward(part) for part in images.split(chunk)])
        finally:
            torch.set_num_threads(threads)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.choice is not None or self.calls == 1 or len(images) < 2:
            return self._run(self.choice or "threads", images)
        way = "threads" if "threads" not in self.per_image else "chunks"
        start = time.perf_counter()
        out = self._run(way, images)
        self.per_image[way] = (time.perf_counter() - start) / len(images)
        if len(self.per_image) == 2:
            self.choice = min(self.per_image, key=self.per_image.__getitem__)
            log.info("CPU forward: %s (%.1f vs %.1f images/s on one batch each)", self.choice,
                     1 / self.per_image[self.choice], 1 / max(self.per_image.values()))
        return out


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


__all__ = ["ONE_THREAD_WORK", "small_work", "cpu_threads_for", "SmallWorkThreads", "CalibratedCpuForward",
           "CHUNK_PIXELS"]
