"""The LR schedule as a pure function of the optimizer step, so a resumed or extended run follows the config.

`sched_cfg` below is the scheduler group's record (config/schema.py SchedulerConfig).

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
from typing import Any, Callable, Literal, cast

import torch
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from transfer_cli.config.checks import check_warmup  # the rule, checked before torch loads too
from transfer_cli.errors import TransferError

ALIASES = {"none": "constant"}  # older configs said scheduler.name=none


@dataclass
class RunLength:
    """The run's length in optimizer steps: what the closed forms need besides the config.

    An LRSchedule's schedulers are built (in configure_optimizers) before the fit knows this, and read it at each
    step, so it is filled in at train start. Until then it is a one-step run, which nothing trains on.
    """

    steps_per_epoch: float = 1.0
    total_steps: int = 1


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
    check_warmup(sched_cfg)
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


def _cosine(step: int, sched_cfg: Any, steps_per_epoch: float, total_steps: int, warmup: float) -> float:
    progress = (step - warmup) / max(1.0, total_steps - warmup)
    return _cos_between(1.0, sched_cfg.min_lr_factor, progress)


def _epoch(step: int, steps_per_epoch: float) -> int:
    return int(step // steps_per_epoch) if steps_per_epoch > 0 else 0


def _step(step: int, sched_cfg: Any, steps_per_epoch: float, total_steps: int, warmup: float) -> float:
    return sched_cfg.gamma ** (_epoch(step, steps_per_epoch) // max(1, sched_cfg.step_epochs))


def _multistep(step: int, sched_cfg: Any, steps_per_epoch: float, total_steps: int, warmup: float) -> float:
    return sched_cfg.gamma ** bisect.bisect_right(sorted(sched_cfg.milestones), _epoch(step, steps_per_epoch))


def _exponential(step: int, sched_cfg: Any, steps_per_epoch: float, total_steps: int, warmup: float) -> float:
    return sched_cfg.gamma ** _epoch(step, steps_per_epoch)


def _constant(step: int, sched_cfg: Any, steps_per_epoch: float, total_steps: int, warmup: float) -> float:
    return 1.0  # plateau too: its decays are applied by ReduceLROnPlateau on top of this


# scheduler=<name>: the LR factor after the warmup, a function of (step, config, run length, warmup steps)
SCHEDULES: dict[str, Callable[[int, Any, float, int, float], float]] = {
    "cosine": _cosine,
    "onecycle": lambda step, cfg, spe, total, warmup: _onecycle(step, cfg, total),
    "step": _step,
    "multistep": _multistep,
    "exponential": _exponential,
    "plateau": _constant,
    "constant": _constant,
}


def decay_factor(step: int, sched_cfg: Any, steps_per_epoch: float, total_steps: int, warmup: float) -> float:
    """The schedule after the warmup (`step` counts from the start of the run)."""
    name = ALIASES.get(sched_cfg.name, sched_cfg.name)
    return SCHEDULES[name](step, sched_cfg, steps_per_epoch, total_steps, warmup)


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

    def __init__(self, optimizer: torch.optim.Optimizer, sched_cfg: Any, run: RunLength):
        self.sched_cfg, self.run = sched_cfg, run
        start = float(sched_cfg.warmup_start_factor)

        def factor(step: int) -> float:  # a plain function: LambdaLR pickles nothing of it into checkpoints
            warmup = self.warmup
            return start + (1.0 - start) * step / warmup if step < warmup else 1.0

        super().__init__(optimizer, factor)

    @property
    def warmup(self) -> float:
        return warmup_steps(self.sched_cfg, self.run.steps_per_epoch)

    def state_dict(self) -> dict:  # plain data only: the config and run length come from the run, not the file
        return {k: v for k, v in super().state_dict().items() if k not in ("sched_cfg", "run")}

    def get_lr(self) -> list[float | torch.Tensor]:  # torch's type: a group's LR may be a tensor
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
        # cast, not a check: the config schema admits only these two, and torch rejects any other value itself.
        super().__init__(optimizer, mode=cast(Literal["min", "max"], mode), factor=sched_cfg.gamma,
                         patience=sched_cfg.patience, min_lr=[lr * sched_cfg.min_lr_factor for lr in warmup.base_lrs])
        self.warmup = warmup

    def step(self, metrics: Any, epoch: int | None = None) -> None:  # type: ignore[override]
        if self.warmup.done:
            super().step(metrics)

    def state_dict(self) -> dict:  # the warmup scheduler is saved on its own
        return {k: v for k, v in super().state_dict().items() if k != "warmup"}


def step_scheduler(optimizer: torch.optim.Optimizer, sched_cfg: Any, run: RunLength) -> LambdaLR:
    """The step-wise schedule of every name but plateau (see plateau_schedulers), over `run`."""
    check_warmup(sched_cfg)
    last: dict[tuple, float] = {}

    def factor(step: int) -> float:  # a plain function: LambdaLR pickles nothing of it into checkpoints
        # LambdaLR asks once per param group (a dozen with per-stage groups) at every step: compute it once.
        key = (step, run.steps_per_epoch, run.total_steps)
        if key not in last:
            last.clear()
            last[key] = lr_factor(step, sched_cfg, run.steps_per_epoch, run.total_steps)
        return last[key]

    return LambdaLR(optimizer, factor)


def build_scheduler(
    optimizer: torch.optim.Optimizer, sched_cfg: Any, steps_per_epoch: float, total_steps: int
) -> LambdaLR:
    """step_scheduler over a run of known length."""
    return step_scheduler(optimizer, sched_cfg, RunLength(steps_per_epoch, total_steps))


def plateau_schedulers(
    optimizer: torch.optim.Optimizer, sched_cfg: Any, run: RunLength, mode: str
) -> tuple[WarmupThenHold, PlateauAfterWarmup]:
    warmup = WarmupThenHold(optimizer, sched_cfg, run)
    return warmup, PlateauAfterWarmup(optimizer, warmup, sched_cfg, mode)


def build_plateau(
    optimizer: torch.optim.Optimizer, sched_cfg: Any, steps_per_epoch: float, mode: str
) -> tuple[WarmupThenHold, PlateauAfterWarmup]:
    """plateau_schedulers over a run of known length."""
    return plateau_schedulers(optimizer, sched_cfg, RunLength(steps_per_epoch, 0), mode)


def follow_schedule(trainer: Any) -> None:
    """Set each group's LR from the schedule function at the current step, for the config and run length as
    they are now.

    The optimizer state of a restored run carries the LR it had when saved, and a restored LambdaLR only
    recomputes it at its next step: without this, the first batch after extending trainer.max_epochs would still
    use the old horizon's LR. In an exact resume the value is the same one, bit for bit (the same expression as
    LambdaLR.get_lr).
    """
    for config in trainer.lr_scheduler_configs:
        sched = config.scheduler
        if type(sched) is not LambdaLR:  # plateau's warmup-then-hold keeps the LRs ReduceLROnPlateau set
            continue
        values = [base * fn(sched.last_epoch) for fn, base in zip(sched.lr_lambdas, sched.base_lrs)]
        for group, lr in zip(sched.optimizer.param_groups, values):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(float(lr))
            else:
                group["lr"] = lr


class LRSchedule:
    """scheduler=<name> for one run: Lightning's scheduler configs, with a length set once the fit knows it.

    `monitor`/`mode`: plateau's metric when the scheduler record names none (callbacks.monitor/mode).
    """

    def __init__(self, sched_cfg: Any, monitor: str, mode: str):
        check_warmup(sched_cfg)
        self.sched_cfg = sched_cfg
        self.monitor = sched_cfg.monitor or monitor
        self.mode = sched_cfg.mode or mode
        self.run = RunLength()

    def configs(self, optimizer: torch.optim.Optimizer, strict: bool = True) -> list[dict[str, Any]]:
        """The LambdaLR per step, or for plateau the warmup per step and ReduceLROnPlateau per epoch on the
        monitored metric (`strict`: a missing metric is an error, not a skipped epoch)."""
        if self.sched_cfg.name != "plateau":
            return [{"scheduler": step_scheduler(optimizer, self.sched_cfg, self.run), "interval": "step"}]
        warmup, plateau = plateau_schedulers(optimizer, self.sched_cfg, self.run, self.mode)
        return [
            {"scheduler": warmup, "interval": "step"},
            {"scheduler": plateau, "interval": "epoch", "monitor": self.monitor, "strict": strict},
        ]

    def start(self, trainer: Any) -> None:
        """At train start (after a resume restored the step): the run's length, and the LR of the current step."""
        length = run_length(trainer)
        self.run.steps_per_epoch, self.run.total_steps = length.steps_per_epoch, length.total_steps
        follow_schedule(trainer)
