"""metrics.csv in the run dir: one row per logging event, its columns sorted, continued by a resume.

A Lightning `Logger` (its public interface), rather than Lightning's CSVLogger, because a resumed run must
continue the file (CSVLogger deletes an existing metrics.csv when it starts) without the rows an interrupted run
logged after its checkpoint, and because one writer keeps one line ending throughout.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Optional

from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from transfer_cli.atomic import atomic_write_text

METRICS_NAME = "metrics.csv"


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _render(keys: list[str], rows: list[dict[str, Any]], header: bool) -> str:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n", restval="")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def prune_metrics(metrics_csv: Path, global_step: int) -> int:
    """Drop the rows logged after a checkpoint (step >= its global_step): the resumed run logs them again.

    Returns how many rows were dropped. Lightning logs a step's metrics at step = optimizer steps before it, and
    epoch-end rows at the epoch's last step, so everything the checkpoint includes has step < global_step.
    """
    keys, rows = _read(metrics_csv)
    keep = [r for r in rows if not r.get("step") or int(float(r["step"])) < global_step]
    if len(keep) != len(rows) or rows:  # also rewrites a file of mixed line ends into one
        atomic_write_text(metrics_csv, _render(keys, keep, header=True))
    return len(rows) - len(keep)


class MetricsCSV(Logger):
    """`<run_dir>/metrics.csv`. `resume_step`: continue the file of a run resumed at that optimizer step."""

    def __init__(self, run_dir: str | Path, resume_step: Optional[int] = None):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_NAME
        self._rows: list[dict[str, Any]] = []
        self._keys: list[str] = []
        if resume_step is not None:
            prune_metrics(self.path, resume_step)
            self._keys = _read(self.path)[0]
        elif self.path.is_file():  # a new run in a dir that held one: its rows are not this run's
            os.unlink(self.path)

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.run_dir)

    @property
    def log_dir(self) -> str:
        return str(self.run_dir)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the run dir's config.yaml holds the whole resolved config

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        row = {k: float(v) if not isinstance(v, (int, float)) else v for k, v in metrics.items()}
        row["step"] = len(self._rows) if step is None else step
        self._rows.append(row)

    @rank_zero_only
    def save(self) -> None:
        if not self._rows:
            return
        new = sorted({k for row in self._rows for k in row} - set(self._keys))
        if new or not self.path.is_file():  # a new column: the whole file gets the new header, atomically
            self._keys = sorted(set(self._keys) | set(new))
            _, old = _read(self.path)
            atomic_write_text(self.path, _render(self._keys, old + self._rows, header=True))
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", newline="") as f:
                f.write(_render(self._keys, self._rows, header=False))
        self._rows = []

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


__all__ = ["MetricsCSV", "prune_metrics", "METRICS_NAME"]
