"""The experiment trackers a run logs to, keyed by the names of the logger group's options.

`logger=[csv,mlflow]` switches on the flags `logger.csv` and `logger.mlflow` (config/schema.py LoggerConfig); each
flag's name is a key of TRACKERS, whose builder returns the Lightning `Logger` (Lightning's own where one exists).
Trackers that keep a run elsewhere (MLflow, W&B) also implement `ExperimentRun`: at fit start they get the resolved
config as params and return the ids a resume needs, which go to `<run dir>/trackers.json`; after the run they
upload its files. `transfer train resume=...` reads trackers.json back, so the resumed run continues the same
tracker run instead of starting another one.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pytorch_lightning as pl
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from transfer_cli.run_files import CONFIG, SUMMARY
from transfer_cli.atomic import atomic_write_json
from transfer_cli.config.schema import LoggerConfig
from transfer_cli.errors import TransferError
from transfer_cli.tracking.csv_logger import MetricsCSV
from transfer_cli.tracking.tracker_run import ExperimentRun, TrackerContext

log = logging.getLogger("transfer_cli")

RUNS_FILE = "trackers.json"  # {tracker name: the ids that find its run again}
# Files of the run dir that trackers upload after the run, when they exist.
RUN_FILES = (CONFIG, SUMMARY, "curves.png", "confusion_matrix.png", "data_report.json",
             "class_distribution.png", "audit.json")


def require(package: str, tracker: str) -> None:
    try:
        importlib.import_module(package)
    except ImportError:
        raise TransferError(f"logger={tracker} needs the {package} package, which is not installed",
                            f"pip install 'transfer-cli[{tracker}]'  (or choose another logger, e.g. logger=csv)")


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{"optimizer.lr": 0.001, ...}: the keys users type on the command line; lists stay whole values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def read_runs(run_dir: Path) -> dict[str, dict]:
    path = Path(run_dir) / RUNS_FILE
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        log.warning("ignoring %s (%s): resumed trackers start new runs", path, e)
        return {}


def _csv(settings: LoggerConfig, ctx: TrackerContext) -> Logger:
    # metrics.csv, continued on resume without the rows logged after the checkpoint
    return MetricsCSV(ctx.run_dir, resume_step=ctx.resume_step)


def _tensorboard(settings: LoggerConfig, ctx: TrackerContext) -> Logger:
    require("tensorboard", "tensorboard")
    # On resume, TensorBoard hides the events an interrupted run wrote after its checkpoint (purge_step).
    purge = {} if ctx.resume_step is None else {"purge_step": ctx.resume_step}
    return TensorBoardLogger(save_dir=str(ctx.run_dir), name="tb", version="", **purge)


def _mlflow(settings: LoggerConfig, ctx: TrackerContext) -> Logger:
    require("mlflow", "mlflow")
    from transfer_cli.tracking.mlflow_run import mlflow_logger

    return mlflow_logger(settings.tracking_uri, ctx)


def _wandb(settings: LoggerConfig, ctx: TrackerContext) -> Logger:
    require("wandb", "wandb")
    from transfer_cli.tracking.wandb_run import wandb_logger

    return wandb_logger(ctx)


# logger.<name>=true (logger=<name>): the Lightning logger of that tracker
TRACKERS: dict[str, Callable[[LoggerConfig, TrackerContext], Logger]] = {
    "csv": _csv,
    "tensorboard": _tensorboard,
    "mlflow": _mlflow,
    "wandb": _wandb,
}


def enabled_trackers(settings: LoggerConfig) -> list[str]:
    return [name for name in TRACKERS if getattr(settings, name)]


def build_trackers(settings: LoggerConfig, ctx: TrackerContext) -> list[Logger]:
    return [TRACKERS[name](settings, ctx) for name in enabled_trackers(settings)]


class TrackerStart(pl.Callback):
    """At fit start: the resolved config goes to every ExperimentRun, and their ids to `<run dir>/trackers.json`."""

    def __init__(self, run_dir: Path, params: dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.params = params

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        runs = read_runs(self.run_dir)
        started = {}
        for logger in trainer.loggers:
            if isinstance(logger, ExperimentRun):
                started[logger.tracker_name] = logger.start(self.params)
        if started:
            atomic_write_json(self.run_dir / RUNS_FILE, {**runs, **started})
            for name, ids in started.items():
                log.info("%s run: %s", name, ", ".join(f"{k}={v}" for k, v in ids.items()))


def finish_trackers(loggers: Sequence[Logger], run_dir: Path, checkpoint: Optional[Path]) -> None:
    """Upload the run's files (and `checkpoint`, when given) to every ExperimentRun. A tracker that fails to take
    them costs a warning, never the run's results, which are on disk already."""
    files = [Path(run_dir) / name for name in RUN_FILES if (Path(run_dir) / name).is_file()]
    for logger in loggers:
        if isinstance(logger, ExperimentRun) and rank_zero_only.rank == 0:
            try:
                logger.upload(files, checkpoint)
            except Exception as e:  # noqa: BLE001 - a tracker's own failure (disk, server)
                log.warning("could not upload the run's files to %s: %s: %s", logger.tracker_name,
                            type(e).__name__, e)


def close_trackers(loggers: Sequence[Logger]) -> None:
    for logger in loggers:
        if isinstance(logger, ExperimentRun):
            logger.close()


__all__ = ["TRACKERS", "TrackerStart", "build_trackers", "enabled_trackers",
           "finish_trackers", "close_trackers", "flatten", "read_runs", "require", "RUNS_FILE", "RUN_FILES"]
