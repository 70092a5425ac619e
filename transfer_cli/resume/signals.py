"""SIGTERM / SIGINT during training: finish the current batch, save a resumable checkpoint, say how to resume.

Lightning already turns SIGTERM into a flag that its loops check between batches, raising SIGTERMException at a
point where the loop counters, optimizer and schedule agree; that is the one safe moment to save. This callback
(1) routes Ctrl+C (SIGINT) into the same flag instead of a KeyboardInterrupt that could land in the middle of an
optimizer step, (2) saves last.ckpt when the SIGTERMException passes through, and (3) remembers which signal it
was, so train() can exit with the conventional status (128 + signal number: 143, 130) and print the command.
A second Ctrl+C aborts at once, without a checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger("transfer_cli")


def exit_status(signum: int) -> int:
    return 128 + int(signum)


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


__all__ = ["GracefulStop", "graceful_stop", "exit_status", "SIGTERMException"]
