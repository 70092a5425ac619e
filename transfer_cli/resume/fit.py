"""trainer.fit for `transfer train`: from a checkpoint when resuming, and a clean exit on SIGTERM / SIGINT."""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from transfer_cli.atomic import leftover_temp_files
from transfer_cli.resume.checkpoints import checkpoint_meta, read_checkpoint
from transfer_cli.resume.fingerprint import check_fingerprint
from transfer_cli.resume.plan import resume_command
from transfer_cli.resume.signals import SIGTERMException, StopSignal, exit_status, graceful_stop, stop_before_training
from transfer_cli.run_files import RunLayout

log = logging.getLogger("transfer_cli")


def _quiet_exit() -> None:
    """The process is on its way out with a status: a further Ctrl+C would only print a traceback from wherever it
    landed (the exit's own cleanup included), so it is ignored."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _again(run_dir: Path) -> str:
    """How to continue a run stopped before its first step: from its checkpoint when resuming, else anew (the
    features the pre-pass finished are in the feature cache and are read back, not recomputed)."""
    if RunLayout(run_dir).last.is_file():
        return f"resume with: {resume_command(run_dir)}"
    # `transfer train` runs its job with argv = [entry, "train", <the job's overrides>] (sweeps/distributed.py)
    command = "transfer " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["train"] else "the same command"
    return ("nothing had trained, so there is nothing to resume; features the pre-pass finished are cached. "
            f"Start it again: {command}")


def fit(trainer: pl.Trainer, module: Any, datamodule: Any, resume: str | None, run_dir: Path) -> None:
    """Fit, or continue the fit saved in `resume` (a checkpoint path, set by `transfer train resume=...`).

    A stop signal ends the process with 128 + its number (143 SIGTERM, 130 SIGINT) once the checkpoint is saved,
    after printing the command that continues the run.
    """
    ckpt = resume
    if ckpt:
        saved = checkpoint_meta(read_checkpoint(ckpt), ckpt)
        check_fingerprint(saved, module.meta, Path(ckpt), run_dir)
        for leftover in leftover_temp_files(Path(ckpt).parent):  # writes cut short by a kill; nothing writes now
            leftover.unlink(missing_ok=True)
        log.info("resuming from %s", ckpt)
    try:
        with stop_before_training():  # setup (the feature pre-pass) runs before Lightning's signal handler
            # weights_only: a resumed checkpoint is plain data, so loading it runs no code from the file
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt or None, weights_only=True if ckpt else None)
    except StopSignal as stop:
        _quiet_exit()
        if trainer.is_global_zero:
            print(f"\nstopped by signal ({stop.signum}) before training started; {_again(run_dir)}", flush=True)
        raise SystemExit(exit_status(stop.signum)) from None
    except SIGTERMException:
        _quiet_exit()
        stop = graceful_stop(trainer)
        status = stop.status if stop is not None else exit_status(15)
        saved_at = stop.saved if stop is not None else None
        if trainer.is_global_zero:
            what = f"checkpoint saved: {saved_at}" if saved_at else "no new checkpoint (nothing trained yet)"
            print(f"\nstopped by signal ({status - 128}); {what}\nresume with: {resume_command(run_dir)}",
                  flush=True)
        raise SystemExit(status) from None
    except (SystemExit, KeyboardInterrupt) as e:
        stop = graceful_stop(trainer)
        # A second Ctrl+C aborts; one that lands after Lightning put Python's handler back (the first stop's
        # checkpoint saved, fit tearing down) is a second Ctrl+C too, not a crash.
        if stop is None or not (stop.aborted or (isinstance(e, KeyboardInterrupt) and stop.signum is not None)):
            raise
        _quiet_exit()
        # Ctrl+C twice: Lightning stopped at once (and exits 1); say so, and how to continue from the last save.
        last = RunLayout(run_dir).last
        if trainer.is_global_zero:
            hint = f"resume from the last checkpoint with: {resume_command(run_dir)}" if last.is_file() \
                else "no checkpoint was saved yet"
            what = f"the first one's checkpoint saved: {stop.saved}" if stop.saved else "without saving"
            print(f"\naborted by a second Ctrl+C, {what}; {hint}", flush=True)
        raise SystemExit(exit_status(signal.SIGINT)) from None


__all__ = ["fit"]
