"""Hydra callback that records every sweep job and writes the sweep summary when the sweep ends.

Registered in configs/hydra/default.yaml. It is what lets a sweep go on past a failing job: Hydra 1.3's
sweepers re-raise a failed job's exception once its batch is done (BasicSweeper reads `JobReturn.return_value`),
which would end the sweep before `on_multirun_end` and leave no summary. So `on_job_end` records the failure in
job.json and hands the sweeper a completed job without a value (a value-driven sweeper then records a failed
trial and goes on). Optuna studies run through `transfer tune` (sweeps/tune.py), which records its trials alike.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from transfer_cli.errors import TransferError
from transfer_cli.sweeps.records import JobRecord, NoValue, run_outcome, write_record

log = logging.getLogger("transfer_cli.sweeps")

# This process's sweep: its jobs and failures (not those of an earlier session of a continued study), for
# `transfer train -m`'s exit status.
LAST_SWEEP: dict[str, Any] = {}


def _is_multirun(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


def _global_rank() -> int:
    # A SLURM job with several tasks runs the job once per task (one per DDP rank); only rank 0 reports it.
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def describe_error(err: BaseException) -> str:
    if isinstance(err, TransferError):
        return err.message + (f" (fix: {err.fix})" if err.fix else "")
    return f"{type(err).__name__}: {err}"


def _failure(job_return: JobReturn) -> BaseException:
    """A failed job's exception: JobReturn.return_value re-raises it, which is how Hydra hands it out."""
    try:
        job_return.return_value
    except BaseException as err:  # noqa: BLE001 - whatever the job raised
        return err
    return RuntimeError("the job failed without an exception")


class SweepRecorder(Callback):
    def __init__(self) -> None:
        self._started: dict[str, float] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        LAST_SWEEP.clear()
        LAST_SWEEP.update(sweep_dir=str(config.hydra.sweep.dir), jobs=0, failed=0)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started[str(config.hydra.runtime.output_dir)] = time.time()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _is_multirun(config) or _global_rank() != 0:
            return
        run_dir = Path(str(config.hydra.runtime.output_dir))
        started = self._started.pop(str(run_dir), None)
        monitor, mode = str(config.callbacks.monitor), str(config.callbacks.mode)
        outcome = run_outcome(run_dir, monitor, mode)
        try:
            job = str(run_dir.relative_to(Path(str(config.hydra.sweep.dir)).resolve()))
        except ValueError:
            job = str(OmegaConf.select(config, "hydra.job.num"))
        record = JobRecord(job=job, overrides=[str(o) for o in config.hydra.overrides.task], status="ok",
                           monitor=monitor, mode=mode, best=outcome["best"], epochs=outcome["epochs"],
                           wall_time_s=None if started is None else round(time.time() - started, 1),
                           run_dir=str(run_dir), extra=outcome["extra"])
        if job_return.status == JobStatus.FAILED:
            err = _failure(job_return)
            record.status, record.error = "failed", describe_error(err)
            if not isinstance(err, TransferError):  # a bug, not a config mistake: keep its traceback in the log
                log.error("job %s failed", job, exc_info=err)
            job_return.status = JobStatus.COMPLETED
            job_return.return_value = NoValue(f"job failed: {record.error}")
        write_record(record)
        LAST_SWEEP["jobs"] = LAST_SWEEP.get("jobs", 0) + 1
        LAST_SWEEP["failed"] = LAST_SWEEP.get("failed", 0) + (record.status != "ok")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from transfer_cli.sweeps.summary import build_summary

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            summary = build_summary(sweep_dir, str(config.callbacks.monitor), str(config.callbacks.mode))
        except TransferError as err:  # e.g. no job ran: nothing to summarise is not worth a traceback
            log.warning("no sweep summary: %s", err.message)
            return
        LAST_SWEEP.update(sweep_dir=str(summary.sweep_dir))
        if not LAST_SWEEP.get("jobs"):  # a remote launcher (SLURM) ran on_job_end elsewhere: count the records
            LAST_SWEEP.update(jobs=len(summary.records), failed=summary.counts.get("failed", 0))
