"""The LR schedule as a pure function of the optimizer step, so a resumed or extended run follows the config."""

from __future__ import annotations

import math
from typing import Any

import torch


def lr_factor(step: int, sched_cfg: Any, steps_per_epoch: float, total_steps: int) -> float:
    """The multiplier of every group's base LR after `step` optimizer steps: linear warmup, then the decay.

    Depends only on (step, config, run length), so a resumed or extended run follows the config exactly.
    """
    warmup = sched_cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        start = sched_cfg.warmup_start_factor
        return start + (1.0 - start) * step / warmup
    name = sched_cfg.name
    if name == "cosine":
        span = max(1.0, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        floor = sched_cfg.min_lr_factor
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    epoch = int(step // steps_per_epoch) if steps_per_epoch > 0 else 0
    if name == "step":
        return sched_cfg.gamma ** (epoch // max(1, sched_cfg.step_epochs))
    if name == "exponential":
        return sched_cfg.gamma**epoch
    return 1.0  # none: constant


def build_scheduler(
    optimizer: torch.optim.Optimizer, sched_cfg: Any, steps_per_epoch: float, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:  # a plain function: LambdaLR pickles nothing of it into checkpoints
        return lr_factor(step, sched_cfg, steps_per_epoch, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
