"""The LR schedule as a pure function of the optimizer step, so a resumed or extended run follows the config.

Every schedule but one is `lr_factor(step, ...)`, the multiplier of each group's base LR, applied by a LambdaLR
stepped once per optimizer step (after gradient accumulation). `plateau` is the exception: its decays depend on
the monitored metric's history, which no step counter knows. It is torch's ReduceLROnPlateau, stepped at the end
of each epoch once the warmup is over, and its state (the best value, the bad-epoch count) travels in the
checkpoint's scheduler state instead.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from transfer_cli.errors import TransferError

ALIASES = {"none": "constant"}  # older configs said scheduler.name=none


@dataclass(frozen=True)
class RunLength:
    """The run's length in optimizer steps: what the closed forms need besides the config."""

    steps_per_epoch: float
    total_steps: int


def run_length(trainer: Any) -> RunLength:
    """From a pl.Trainer inside configure_optimizers. Steps are optimizer steps: with accumulate_grad_batches=k an
    epoch of n batches is ceil(n / k) of them (Lightning steps on the last, partial accumulation too)."""
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise TransferError("the LR schedule needs a finite run",
                            "set trainer.max_epochs (or +trainer.kwargs.max_steps)")
    batches = trainer.num_training_batches
    if math.isfinite(batches) and batches > 0:
        per_epoch = float(math.ceil(batches / trainer.accumulate_grad_batches))
    else:  # an iterable data set of unknown length
        per_epoch = total / max(1, trainer.max_epochs or 1)
    return RunLength(per_epoch, int(total))


def warmup_steps(sched_cfg: Any, steps_per_epoch: float) -> float:
    if sched_cfg.warmup_steps and sched_cfg.warmup_epochs:
        raise TransferError(
            "scheduler.warmup_steps and scheduler.warmup_epochs are both set",
            "keep one: scheduler.warmup_epochs=0 or scheduler.warmup_steps=0",
        )
    if sched_cfg.warmup_steps:
        return float(sched_cfg.warmup_steps)
    return float(sched_cfg.warmup_epochs) * steps_per_epoch


def _cos_between(start: float, end: float, progress: float) -> float:
    """From start (progress 0) to end (progress 1) along half a cosine."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def _onecycle(step: int, sched_cfg: Any, total_steps: int) -> float:
    # torch's OneCycleLR (cosine annealing, two phases), as a factor of the peak LR, with the same step indexing.
    peak_step = float(sched_cfg.pct_start) * total_steps - 1
    start = 1.0 / sched_cfg.div_factor
    end = start / sched_cfg.final_div_factor
    if step <= peak_step:
        return _cos_between(start, 1.0, step / peak_step if peak_step > 0 else 1.0)
    span = (total_steps - 1) - peak_step
    return _cos_between(1.0, end, (step - peak_step) / span if span > 0 else 1.0)


def decay_factor(step: int, sched_cfg: Any, steps_per_epoch: float, total_steps: int, warmup: float) -> float:
    """The schedule after the warmup (`step` counts from the start of the run)."""
    name = ALIASES.get(sched_cfg.name, sched_cfg.name)
    if name == "cosine":
        progress = (step - warmup) / max(1.0, total_steps - warmup)
        return _cos_between(1.0, sched_cfg.min_lr_factor, progress)
    if name == "onecycle":
        return _onecycle(step, sched_cfg, total_steps)
    epoch = int(step // steps_per_epoch) if steps_per_epoch > 0 else 0
    if name == "step":
        return sched_cfg.gamma ** (epoch // max(1, sched_cfg.step_epochs))
    if name == "multistep":
        return sched_cfg.gamma ** bisect.bisect_right(sorted(sched_cfg.milestones), epoch)
    if name == "exponential":
        return sched_cfg.gamma**epoch
    return 1.0  # constant; plateau's decays are applied by ReduceLROnPlateau on top of this


def lr_factor(step: int, sched_cfg: Any, steps_per_epoch: float, total_steps: int) -> float:
    """The multiplier of every group's base LR after `step` optimizer steps: linear warmup, then the decay.

    Depends only on (step, config, run length), so a resumed or extended run follows the config exactly.
    """
    warmup = warmup_steps(sched_cfg, steps_per_epoch)
    if step < warmup:
        start = sched_cfg.warmup_start_factor
        return start + (1.0 - start) * step / warmup
    return decay_factor(step, sched_cfg, steps_per_epoch, total_steps, warmup)


class WarmupThenHold(LambdaLR):
    """plateau's warmup: the linear warmup of lr_factor, then it leaves the LR to ReduceLROnPlateau.

    A plain LambdaLR would reset every group to base LR x 1 at each step after the warmup, undoing the decays.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, sched_cfg: Any, steps_per_epoch: float):
        self.warmup = warmup_steps(sched_cfg, steps_per_epoch)
        start = float(sched_cfg.warmup_start_factor)
        warmup = self.warmup

        def factor(step: int) -> float:  # a plain function: LambdaLR pickles nothing of it into checkpoints
            return start + (1.0 - start) * step / warmup if step < warmup else 1.0

        super().__init__(optimizer, factor)

    def get_lr(self) -> list[float]:
        # From the first whole step at or past the warmup the factor is 1; after that one, hold.
        if self.last_epoch > math.ceil(self.warmup):
            return [group["lr"] for group in self.optimizer.param_groups]
        return super().get_lr()

    @property
    def done(self) -> bool:
        return self.last_epoch >= self.warmup


class PlateauAfterWarmup(ReduceLROnPlateau):
    """ReduceLROnPlateau that ignores the epochs of the warmup (their metric says little about the final LR)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: WarmupThenHold, sched_cfg: Any, mode: str):
        # The floor is relative to each group's configured LR (the warmup's base), not to its warmup start.
        super().__init__(optimizer, mode=mode, factor=sched_cfg.gamma, patience=sched_cfg.patience,
                         min_lr=[lr * sched_cfg.min_lr_factor for lr in warmup.base_lrs])
        self.warmup = warmup

    def step(self, metrics: Any, epoch: int | None = None) -> None:  # type: ignore[override]
        if self.warmup.done:
            super().step(metrics)

    def state_dict(self) -> dict:  # the warmup scheduler is saved on its own
        return {k: v for k, v in super().state_dict().items() if k != "warmup"}


def build_scheduler(
    optimizer: torch.optim.Optimizer, sched_cfg: Any, steps_per_epoch: float, total_steps: int
) -> LambdaLR:
    """The step-wise schedule of every name but plateau (see build_plateau)."""
    warmup_steps(sched_cfg, steps_per_epoch)  # fail now on a contradictory warmup, not at the first step
    if sched_cfg.name == "onecycle" and (sched_cfg.warmup_epochs or sched_cfg.warmup_steps):
        raise TransferError(
            "scheduler=onecycle has its own warmup (scheduler.pct_start of the run)",
            "scheduler.warmup_epochs=0 scheduler.warmup_steps=0, and set scheduler.pct_start",
        )

    # LambdaLR asks once per param group (a dozen with per-stage groups) at every step: read the config as a
    # plain namespace and compute each step once, instead of ~70 OmegaConf lookups per step.
    plain = SimpleNamespace(**OmegaConf.to_container(sched_cfg, resolve=True)) if OmegaConf.is_config(sched_cfg) \
        else sched_cfg
    last: dict[int, float] = {}

    def factor(step: int) -> float:  # a plain function: LambdaLR pickles nothing of it into checkpoints
        if step not in last:
            last.clear()
            last[step] = lr_factor(step, plain, steps_per_epoch, total_steps)
        return last[step]

    return LambdaLR(optimizer, factor)


def build_plateau(
    optimizer: torch.optim.Optimizer, sched_cfg: Any, steps_per_epoch: float, mode: str
) -> tuple[WarmupThenHold, PlateauAfterWarmup]:
    warmup = WarmupThenHold(optimizer, sched_cfg, steps_per_epoch)
    return warmup, PlateauAfterWarmup(optimizer, warmup, sched_cfg, mode)


def lightning_schedulers(
    optimizer: torch.optim.Optimizer, sched_cfg: Any, run: RunLength, monitor: str, mode: str, strict: bool = True
) -> list[dict[str, Any]]:
    """Lightning's scheduler configs: the LambdaLR per step, or for plateau the warmup per step and
    ReduceLROnPlateau per epoch on `monitor` (`strict`: a missing metric is an error, not a skipped epoch)."""
    if sched_cfg.name != "plateau":
        scheduler: LRScheduler = build_scheduler(optimizer, sched_cfg, run.steps_per_epoch, run.total_steps)
        return [{"scheduler": scheduler, "interval": "step"}]
    warmup, plateau = build_plateau(optimizer, sched_cfg, run.steps_per_epoch, sched_cfg.get("mode") or mode)
    return [
        {"scheduler": warmup, "interval": "step"},
        {"scheduler": plateau, "interval": "epoch", "monitor": sched_cfg.monitor or monitor, "strict": strict},
    ]
