"""What a run dir holds and where: the layout (one name per file), and the summary a finished run writes.

Every module that writes or reads a run's files asks `RunLayout` for the path, so a file is named once; the
summary's keys and types are `RunSummary`'s, the one description that `train()` fills and the sweep records,
k-fold, the hub card and the trackers read back. Standard library only: the CLI's checks read run dirs before
torch loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypedDict

CHECKPOINT_DIR = "checkpoints"  # <run dir>/checkpoints/{best,last}.ckpt
LAST, BEST = "last.ckpt", "best.ckpt"
SUMMARY, METRICS, CONFIG = "summary.json", "metrics.csv", "config.yaml"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def config(self) -> Path:  # the resolved config the run trained with (the checkpoints carry it too)
        return self.root / CONFIG

    @property
    def summary(self) -> Path:  # written once, at the end: a run dir with it holds a finished run
        return self.root / SUMMARY

    @property
    def metrics(self) -> Path:  # every logged value, one row per step or epoch (tracking/csv_logger.py)
        return self.root / METRICS

    @property
    def audit(self) -> Path:  # the pre-flight audit of what trains, at fit start and each milestone
        return self.root / "audit.json"

    @property
    def bad_images(self) -> Path:  # the images that could not be read, with why
        return self.root / "bad_images.txt"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST

    @property
    def best(self) -> Path:
        return self.checkpoints / BEST


class RunSummary(TypedDict, total=False):
    """summary.json. A key is None where the run has nothing for it (no test split: test_acc)."""

    name: str
    val_acc: Optional[float]
    test_acc: Optional[float]
    epochs: int
    best_checkpoint: Optional[str]
    last_checkpoint: Optional[str]
    test_checkpoint: Optional[str]
    run_dir: str
    num_classes: int
    class_names: list[str]
    train_size: int
    val_size: int
    test_size: int
    feature_cache: bool
    batch_size: int
    bad_images: int
    duplicates_across_splits: int
    first_step_latency_s: Optional[float]
    first_batch_latency_s: Optional[float]
    probe: dict[str, Any]  # a solved or LP-FT probe's strength, fit and curve (training/probe.py)
    task: str  # only for task=multilabel, with its metrics:
    val_mAP: Optional[float]
    val_f1: Optional[float]
    test_mAP: Optional[float]
    calibration: dict[str, Any]  # temperature and threshold per checkpoint (assembly/calibration.py)
    wall_time_s: float


def read_summary(run_dir: Path) -> RunSummary:
    """A finished run's summary.json (a ValueError or OSError when it is unreadable: the caller says what then)."""
    summary: RunSummary = json.loads(RunLayout(Path(run_dir)).summary.read_text())
    return summary


__all__ = ["RunLayout", "RunSummary", "read_summary", "CHECKPOINT_DIR", "LAST", "BEST", "SUMMARY", "METRICS", "CONFIG"]
