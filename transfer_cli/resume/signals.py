"""SIGTERM / SIGINT during training: finish the current batch, save a resumable checkpoint, say how to resume.

Lightning already turns SIGTERM into a flag that its loops check between batches, raising SIGTERMException at a
point where the loop counters, optimizer and schedule agree; that is the one safe moment to save. This callback
(1) routes Ctrl+C (SIGINT) into the same flag instead of a KeyboardInterrupt that could land in the middle of an
optimizer step, (2) saves last.ckpt when the SIGTERMException passes through, and (3) remembers which signal it
was, so train() can exit with the conventional status (128 + signal number: 143, 130) and print the command.
A second Ctrl+C aborts at once, without a checkpoint.

Lightning installs its handler only once the run is set up, so a stop signal during setup (the frozen backbone's
feature pre-pass, a linear probe, restoring a checkpoint), which can take minutes, would otherwise meet Python's
defaults: SIGTERM kills the process on the spot, Ctrl+C is a KeyboardInterrupt traceback. `stop_before_training`
covers that window: nothing has trained, so there is nothing to save; the signal raises StopSignal, which unwinds
whatever runs (atomic writes drop their temp files, so no partial cache entry is left) and fit() exits with
128 + the signal's number.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger("transfer_cli")


def exit_status(signum: int) -> int:
    return 128 + int(signum)


class StopSignal(BaseException):
    """A stop signal before training started. A BaseException, like KeyboardInterrupt, so that no `except
    Exception` on the way (a damaged cache file is recomputed, a plot never fails a run) swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)


@contextmanager
def stop_before_training() -> Iterator[None]:
    """SIGTERM and SIGINT raise StopSignal until Lightning's own handlers take over (see the module docstring)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def early(signum: int, frame: Any) -> None:
        # Lightning chains the handler it finds, so this one still runs once Lightning's is in place; from then
        # on Lightning's flag stops the loop at a safe point (and GracefulStop saves), so this one steps aside.
        if signal.getsignal(signum) is early:
            raise StopSignal(signum)

    previous = {signum: signal.signal(signum, early) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class GracefulStop(pl.Callback):
    def __init__(self, checkpoint_path: Path):
        self.checkpoint_path = Path(checkpoint_path)
        self.signum: Optional[int] = None  # the first stop signal received
        self.saved: Optional[Path] = None
        self.aborted = False  # Ctrl+C twice: stopped at once, without a checkpoint

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed here, after Lightning registered its SIGTERM handler (we chain to it) and before the first
        # batch; Lightning's signal teardown puts the previous handlers back when fit ends.
        if threading.current_thread() is not threading.main_thread():
            return
        lightning_handler = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: Any) -> None:
            self.signum = self.signum or signum
            if callable(lightning_handler):
                lightning_handler(signum, frame)

        def on_sigint(signum: int, frame: Any) -> None:
            if self.signum is not None:
                self.aborted = True
                raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
            self.signum = signum
            log.warning("interrupted: finishing this batch and saving a checkpoint (Ctrl+C again: abort, no save)")
            if callable(lightning_handler):  # Lightning's stop flag (its log line says SIGTERM whatever the signal)
                lightning_handler(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
        signal.signal(signal.SIGINT, on_sigint)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        self.signum = self.signum or int(signal.SIGTERM)  # a SIGTERM before on_train_start (setup, sanity check)
        trainer.save_checkpoint(self.checkpoint_path)  # atomic (AtomicCheckpointIO); every rank takes part
        self.saved = self.checkpoint_path

    @property
    def status(self) -> int:
        return exit_status(self.signum or signal.SIGTERM)


def graceful_stop(trainer: pl.Trainer) -> Optional[GracefulStop]:
    return next((cb for cb in trainer.callbacks if isinstance(cb, GracefulStop)), None)


__all__ = ["GracefulStop", "graceful_stop", "exit_status", "SIGTERMException", "StopSignal", "stop_before_training"]
