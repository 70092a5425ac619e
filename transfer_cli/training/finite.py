"""A training run whose loss or weights stop being finite stops, naming the step and the fix.

A diverged run otherwise trains on to the end, saves NaN weights as best.ckpt and last.ckpt and exits 0; then
every prediction is NaN. Watching costs no per-step host sync: each step folds `isfinite(loss)` into a tensor on
the device, which is read only when the loop already waits (every log_every_n_steps steps, at epoch ends) and
before a checkpoint is written, which is also when the weights are checked.
"""

from __future__ import annotations

from typing import Iterable

import torch

from transfer_cli.errors import TransferError

FIX = ("lower the learning rate (e.g. optimizer.lr divided by 10), clip gradients (trainer.gradient_clip_val=1.0), "
       "or train in full precision (trainer.precision=32-true)")


def non_finite(tensors: Iterable[torch.Tensor]) -> list[int]:
    """Positions of the floating-point tensors holding a NaN or an infinity."""
    return [i for i, t in enumerate(tensors) if t.is_floating_point() and not bool(torch.isfinite(t).all())]


class FiniteWatch:
    """The first optimizer step whose training loss was not finite, kept on the loss's device until read."""

    def __init__(self) -> None:
        self._first_bad: torch.Tensor | None = None  # -1 while every loss was finite

    def observe(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        here = torch.full_like(self._first_bad, step)
        self._first_bad = torch.where(bad & (self._first_bad < 0), here, self._first_bad)

    def check(self, epoch: int) -> None:
        if self._first_bad is None:
            return
        step = int(self._first_bad)  # a host sync: only where the caller already waits
        if step >= 0:
            raise TransferError(f"the training loss became NaN or infinite at optimizer step {step} (epoch {epoch}); "
                                "the run stopped, and no checkpoint with those weights was written", FIX)


def check_weights(state: dict, what: str) -> None:
    """Raise when any floating-point tensor of a state dict is not finite."""
    names = list(state)
    bad = [names[i] for i in non_finite(state[n] for n in names)]
    if bad:
        shown = ", ".join(bad[:5]) + (f" ... and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise TransferError(f"{what} holds NaN or infinite weights ({len(bad)} tensors: {shown})", FIX)


__all__ = ["FiniteWatch", "check_weights", "non_finite", "FIX"]
