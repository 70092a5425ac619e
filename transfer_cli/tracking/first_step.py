"""How long a run makes its user wait: from the network built to the first optimizer step done.

What lies in between is everything a training run does once before it trains: the trainer's set-up, the
data-loader workers starting, the feature pre-pass, the first batch, cuDNN's autotuning and compilation. The
imports (torch, Lightning, timm) come before the network is built and are not counted. summary.json reports it
as `first_step_latency_s` (and `first_batch_latency_s`, the part until the first batch was in hand).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import pytorch_lightning as pl
import torch


class FirstStepLatency(pl.Callback):
    """Seconds from `start` (a `time.perf_counter()` reading) to the first training batch and to the end of its
    step, in the first fit after `start`. The device is synchronized once, so the step's kernels are counted."""

    def __init__(self, start: float):
        self.start = float(start)
        self.first_batch_s: Optional[float] = None
        self.first_step_s: Optional[float] = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.first_batch_s is None:
            self.first_batch_s = time.perf_counter() - self.start

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.first_step_s is None:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            self.first_step_s = time.perf_counter() - self.start


__all__ = ["FirstStepLatency"]
