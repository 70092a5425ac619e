"""Which RUNNING trials of a shared Optuna study still have a live worker, and the study's trial budget.

Several `transfer tune` workers (local processes, SLURM tasks) share one study. A trial whose worker was killed
stays RUNNING in the storage forever; one whose worker lives must never be failed by another worker. Optuna's own
heartbeat does not cover this: it exists for RDBStorage only (JournalStorage has none, Optuna 4 and 5) and only
inside `study.optimize`, whose loop cannot hold the ask lock that keeps the budget exact (tune.py). So each trial
carries two user attributes, the same on every storage:
- `worker`: {host, pid} of the process running it; on that host a dead PID means dead at once (run_dir's test);
- `heartbeat`: a Unix time, refreshed every tune.heartbeat_s by a thread from the ask to the tell. A trial whose
  last sign of life (heartbeat, else its start) is older than tune.grace_s is dead, wherever its worker ran.
A dead trial is marked FAIL and queued again by Optuna's retry callback (the same params, `retry_history` in its
system attrs), at most MAX_RETRIES times: a trial that kills its worker each time (out of memory) stays failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

from transfer_cli.run_dir import owner_alive

log = logging.getLogger("transfer_cli.sweeps")

WORKER, HEARTBEAT = "worker", "heartbeat"  # user attributes of a trial (see the module's docstring)
RERUN_OF = "rerun_of"  # how transfer tune marked a re-queued trial before the retry callback did it
MAX_RETRIES = 3


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The retry callback and its history are experimental in Optuna: said once in the README, not per call."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated alias's warning, on Optuna >= 4.9
        yield


def _retry_class() -> Any:
    import optuna

    # Optuna 4.9 renamed RetryFailedTrialCallback (kept as a deprecated alias) to RetryHeartbeatStaleTrialCallback.
    renamed = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    return renamed or optuna.storages.RetryFailedTrialCallback


def this_worker() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def mark_alive(trial: Any) -> None:
    """Claim a trial just asked (a re-queued one carries its dead worker's attributes until now)."""
    trial.set_user_attr(WORKER, this_worker())
    trial.set_user_attr(HEARTBEAT, time.time())


class Heartbeat:
    """While the block runs, a daemon thread refreshes the trial's heartbeat every `interval` seconds."""

    def __init__(self, trial: Any, interval: float):
        self.trial, self.interval = trial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="tune-heartbeat", daemon=True)

    def _beat(self) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        while not self._stop.wait(self.interval):
            try:
                self.trial.set_user_attr(HEARTBEAT, time.time())
            except UpdateFinishedTrialError:  # told between two beats (or failed by a worker that took it for dead)
                return
            except Exception as err:  # a busy SQLite file, a slow NFS: the next beat may pass; grace_s allows it
                log.warning("trial %d: heartbeat not recorded (%s)", self.trial.number, err)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def last_sign_of_life(trial: Any) -> float:
    beat = trial.user_attrs.get(HEARTBEAT)
    if isinstance(beat, (int, float)):
        return float(beat)
    return trial.datetime_start.timestamp() if trial.datetime_start else 0.0


def is_dead(trial: Any, grace_s: float, now: float) -> bool:
    """A RUNNING trial's worker is gone: its PID is dead on this host, or no sign of life for grace_s."""
    worker = trial.user_attrs.get(WORKER)
    if isinstance(worker, dict) and worker.get("host") == socket.gethostname() and not owner_alive(worker):
        return True
    return now - last_sign_of_life(trial) > grace_s


def fail_dead_trials(study: Any, grace_s: float) -> list[int]:
    """Mark the trials of dead workers failed and queue their params again; their numbers. Call it under the
    study's ask lock, so that two workers never both judge (and re-queue) the same trial."""
    from optuna.trial import TrialState

    now, failed = time.time(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_dead(trial, grace_s, now):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError) as err:  # its worker told a result just now (or another judge did)
            log.info("trial %d: not failed (%s)", trial.number, err)
            continue
        failed.append(trial.number)
        with _quiet():
            _retry_class()(max_retry=MAX_RETRIES)(study, study.trials[trial.number])
    return failed


def superseded(trials: list[Any]) -> set[int]:
    """Numbers of the trials that were re-queued: another trial runs their params again."""
    with _quiet():
        gone = {number for t in trials for number in _retry_class().retry_history(t)}
    return gone | {t.user_attrs[RERUN_OF] for t in trials if RERUN_OF in t.user_attrs}


@dataclass
class Tally:
    done: int  # finished (complete, pruned, failed), not counting those re-queued
    running: int
    waiting: int  # queued: re-runs of dead trials, or trials enqueued by hand

    def wants_trial(self, n_trials: int) -> bool:
        """Whether a worker should ask for a trial: a queued one always runs; a new one while under budget."""
        return self.waiting > 0 or self.done + self.running < n_trials


def tally(study: Any) -> Tally:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    gone = superseded(trials)
    return Tally(done=sum(t.state.is_finished() and t.number not in gone for t in trials),
                 running=sum(t.state == TrialState.RUNNING for t in trials),
                 waiting=sum(t.state == TrialState.WAITING for t in trials))


__all__ = ["mark_alive", "Heartbeat", "is_dead", "fail_dead_trials", "superseded", "Tally", "tally", "this_worker",
           "WORKER", "HEARTBEAT", "MAX_RETRIES"]
