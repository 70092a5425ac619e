"""One small JSON per sweep job (job.json in its run dir), and reading them back from a sweep dir.

Records are files rather than in-memory state so that a sweep cut short, or one whose jobs ran on other machines
(SLURM), can still be summarised later by `transfer sweep-summary <sweep dir>`. No torch import here.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from transfer_cli.atomic import atomic_write_json
from transfer_cli.run_files import RunLayout

RECORD_NAME = "job.json"


@dataclass
class JobRecord:
    job: str  # the job's subdir of the sweep dir ("0", "1", ...)
    overrides: list[str]
    status: str  # ok | failed | interrupted (started, never finished: killed, or still running)
    monitor: str
    mode: str  # max | min: the direction in which `monitor` improves
    best: Optional[float] = None  # best value of `monitor` over the epochs
    epochs: Optional[int] = None
    wall_time_s: Optional[float] = None
    run_dir: str = ""
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # test_acc and the like, when the run reported them


def _finite(value: Any) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def metric_history(run_dir: Path, metric: str) -> list[float]:
    """The per-epoch values of `metric` in the run's metrics.csv (empty when there is no CSV log)."""
    path = RunLayout(run_dir).metrics
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        values = [_finite(row.get(metric)) for row in csv.DictReader(f)]
    return [v for v in values if v is not None]


def best_of(values: list[float], mode: str) -> Optional[float]:
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def run_outcome(run_dir: Path, monitor: str, mode: str) -> dict[str, Any]:
    """Best monitored value, epochs and headline numbers of a run, from the files the run leaves behind."""
    summary_path = RunLayout(run_dir).summary
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    history = metric_history(run_dir, monitor)
    best = best_of(history, mode)
    if best is None:  # no metrics.csv (logger=none): the summary holds val/acc as val_acc, the best when monitored
        best = _finite(summary.get(monitor.replace("/", "_")))
    epochs = summary.get("epochs")
    if epochs is None and history:
        epochs = len(history)  # a run that failed after some epochs: count its validation rows
    extra = {k: summary[k] for k in ("val_acc", "test_acc", "val_mAP", "test_mAP") if summary.get(k) is not None}
    return {"best": best, "epochs": epochs, "extra": extra}


def write_record(record: JobRecord) -> Path:
    return atomic_write_json(Path(record.run_dir) / RECORD_NAME, asdict(record))  # never half a record


def _read_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def _job_sort_key(path: Path) -> tuple:  # "2" before "10"
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)


def collect_records(sweep_dir: Path, monitor: str = "val/acc", mode: str = "max") -> list[JobRecord]:
    """Every job of a sweep dir: its job.json, or, for a job that never finished, what its files say.

    A job dir is any subdir holding job.json or Hydra's .hydra/overrides.yaml (written before the job starts).
    """
    records = []
    candidates = {p.parent for p in sweep_dir.glob(f"**/{RECORD_NAME}")}
    candidates |= {p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")}
    for job_dir in sorted(candidates, key=_job_sort_key):
        if job_dir == sweep_dir:
            continue
        path = job_dir / RECORD_NAME
        name = str(job_dir.relative_to(sweep_dir))
        if path.is_file():
            data = json.loads(path.read_text())
            data["job"] = name
            records.append(JobRecord(**data))
            continue
        outcome = run_outcome(job_dir, monitor, mode)
        records.append(JobRecord(job=name, overrides=_read_overrides(job_dir), status="interrupted", monitor=monitor,
                                 mode=mode, best=outcome["best"], epochs=outcome["epochs"], run_dir=str(job_dir),
                                 error="no job.json: the job was stopped (or is still running)",
                                 extra=outcome["extra"]))
    return records


class NoValue:
    """A job's result when it has no number to optimise. Not NaN: Optuna 2's `tell` raises on NaN, and the Optuna
    sweeper then fails the whole sweep; a value that refuses float() is what it records as a failed trial."""

    def __init__(self, reason: str):
        self.reason = reason

    def __float__(self) -> float:
        raise ValueError(self.reason)

    def __str__(self) -> str:
        return f"no value: {self.reason}"


def objective(run_dir: Path, monitor: str, mode: str) -> "float | NoValue":
    """What a sweeper optimises: the run's best `monitor`."""
    best = run_outcome(run_dir, monitor, mode)["best"]
    return NoValue(f"the run logged no {monitor}") if best is None else best
