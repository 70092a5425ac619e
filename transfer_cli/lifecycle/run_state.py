"""What a resumed run checks and continues: the data/model fingerprint, metrics.csv and TensorBoard's step.

The fingerprint names what the checkpoint's weights mean: the backbone(s), the classes in their index order and
the task. A resume against data whose classes changed would silently map outputs to the wrong names.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Optional

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from transfer_cli.errors import TransferError
from transfer_cli.lifecycle.atomic_io import atomic_write_bytes

log = logging.getLogger("transfer_cli")

FINGERPRINT_KEY = "fingerprint"


def fingerprint(meta: dict[str, Any]) -> dict[str, Any]:
    """From the run metadata (train.build_data's `meta`, or a checkpoint's `transfer` block)."""
    names = [str(n) for n in meta.get("class_names", [])]
    return {"backbone": meta.get("backbone"), "class_names": names, "num_classes": len(names),
            "task": meta.get("task", "multiclass")}


def check_fingerprint(saved_meta: dict[str, Any], current_meta: dict[str, Any], ckpt: Path, run_dir: Path) -> None:
    """Raise a TransferError naming every difference between the checkpoint's run and the run being resumed."""
    saved = saved_meta.get(FINGERPRINT_KEY) or fingerprint(saved_meta)
    now = fingerprint(current_meta)
    diffs = []
    for key in ("backbone", "task", "num_classes", "class_names"):
        if saved.get(key) != now.get(key):
            if key == "class_names":
                gone = [c for c in saved[key] if c not in now[key]]
                new = [c for c in now[key] if c not in saved[key]]
                detail = f"missing now: {gone}; new: {new}" if gone or new else "same classes, another order"
                diffs.append(f"class_names ({detail})")
            else:
                diffs.append(f"{key}: {saved.get(key)!r} in the checkpoint, {now.get(key)!r} now")
    if diffs:
        raise TransferError(
            f"cannot resume {ckpt}: the run does not match its checkpoint: " + "; ".join(diffs),
            "point the data back at what the run trained on, or start a new run from its weights: "
            f"transfer train <overrides> model.weights={ckpt}",
        )


# ------------------------------------------------------------------ metrics.csv


def prune_metrics(metrics_csv: Path, global_step: int) -> int:
    """Drop the rows logged after the checkpoint (step >= its global_step): the resumed run logs them again.

    Returns how many rows were dropped. Lightning logs a step's metrics at step = optimizer steps before it, and
    epoch-end rows at the epoch's last step, so everything the checkpoint includes has step < global_step.
    """
    if not metrics_csv.is_file():
        return 0
    with open(metrics_csv, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    keep = [r for r in rows if not r.get("step") or int(float(r["step"])) < global_step]
    if len(keep) == len(rows):
        return 0
    import io

    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=header, lineterminator=os.linesep)
    writer.writeheader()
    writer.writerows(keep)
    atomic_write_bytes(metrics_csv, out.getvalue().encode())
    return len(rows) - len(keep)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv and starts a new header; this one keeps the file and
    its columns, and appends (adding columns, if new metrics appear, by rewriting it once)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def _check_log_dir_exists(self) -> None:  # the parent's version removes metrics.csv
        pass


class AppendingCSVLogger(CSVLogger):
    """CSVLogger that continues the run dir's metrics.csv (resume)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def follow_schedule(trainer: Any) -> None:
    """Set each group's LR from the schedule function at the restored step, for the config as it is now.

    The optimizer state carries the LR it had when saved, and a restored LambdaLR only recomputes it at its next
    step: without this, the first batch after extending trainer.max_epochs would still use the old horizon's LR.
    In an exact resume the value is the same one, bit for bit (the same expression as LambdaLR.get_lr).
    """
    import torch
    from torch.optim.lr_scheduler import LambdaLR

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
        sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]


def resumed_global_step(ckpt_path: Optional[str]) -> Optional[int]:
    """The checkpoint's optimizer step (for pruning metrics.csv and TensorBoard's purge_step)."""
    if not ckpt_path:
        return None
    from transfer_cli.lifecycle.checkpoint_files import read_checkpoint

    return int(read_checkpoint(ckpt_path).get("global_step", 0))


__all__ = ["fingerprint", "check_fingerprint", "prune_metrics", "AppendingCSVLogger", "FINGERPRINT_KEY",
           "resumed_global_step", "follow_schedule"]
