"""logger=mlflow: Lightning's MLFlowLogger, plus the config as params, the run's files as artifacts, and resume.

The store is `logger.tracking_uri`, else $MLFLOW_TRACKING_URI, else a SQLite file `outputs/mlflow.db` under the
folder the command runs from (MLflow's own default backend is SQLite too); a SQLite store keeps its artifacts in
`mlartifacts/` beside the database. A resumed run reopens the MLflow run kept in trackers.json, so its metric
steps continue where the checkpoint left off (MLflow cannot delete values, so steps that an interrupted run
logged after its last checkpoint appear twice in MLflow's history; metrics.csv drops them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from mlflow.exceptions import MlflowException
from pytorch_lightning.loggers import MLFlowLogger

try:
    from sqlalchemy.exc import SQLAlchemyError
except ImportError:  # mlflow-skinny: no SQL stores, so no SQLAlchemy and none of its errors
    SQLAlchemyError = MlflowException  # type: ignore[misc,assignment]

from transfer_cli.errors import TransferError
from transfer_cli.tracking.tracker_run import ExperimentRun, TrackerContext

SQLITE = "sqlite:///"
PARAM_VALUE_CHARS = 500  # every MLflow since 1.28 stores this much of a param value
PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
RESUMED_TAG = "resumed."  # a param a resume changed (MLflow params never change): its new value as a tag


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"{SQLITE}{Path.cwd() / 'outputs' / 'mlflow.db'}"


def absolute_uri(uri: str) -> str:
    """A SQLite store by its absolute path, so a resume from another folder finds the same database."""
    if not uri.startswith(SQLITE):
        return uri
    db = Path(uri[len(SQLITE):]).expanduser().resolve()
    db.parent.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
    return f"{SQLITE}{db}"


SQLITE_MAGIC = b"SQLite format 3\x00"  # the first bytes of every SQLite database file
DAMAGED = "not an SQLite database (the file does not start with SQLite's header)"


def check_sqlite_store(uri: str) -> None:
    """A SQLite store that cannot work, refused at once: MLflow itself would retry opening an unopenable file
    for about 100 s before failing with a traceback. A missing or empty file is a new store."""
    if not uri.startswith(SQLITE):
        return
    db = Path(uri[len(SQLITE):])
    if db.is_file():
        with open(db, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
        if head and head != SQLITE_MAGIC:
            raise _store_error(uri, DAMAGED)
    # SQLite writes the database and, beside it, its journal: both the file and its folder must be writable
    for path in (db, db.parent) if db.exists() else (db.parent,):
        if not os.access(path, os.W_OK):
            raise _store_error(uri, f"{path} is not writable")


def _store_error(uri: str, err: BaseException | str) -> TransferError:
    """What a user can do about a store MLflow cannot open or write: never touch it, point elsewhere."""
    reason = err if isinstance(err, str) else " ".join(str(getattr(err, "orig", None) or err).split())[:300]
    where = uri[len(SQLITE):] if uri.startswith(SQLITE) else uri
    if reason == DAMAGED or "not a database" in reason or "malformed" in reason:
        fix = (f"move the damaged file aside (mv '{where}' '{where}.damaged') or use another store: "
               "logger.tracking_uri=sqlite:///<folder>/mlflow.db; or train without MLflow: logger=csv")
    elif "filesystem tracking backend" in reason:  # MLflow 3 refuses folder (./mlruns) stores for new runs
        fix = ("use a SQLite store: logger.tracking_uri=sqlite:///<folder>/mlflow.db (`mlflow migrate-filestore` "
               "moves a folder store's runs into one); or train without MLflow: logger=csv")
    else:
        fix = ("use a store you may write to: logger.tracking_uri=sqlite:///<writable folder>/mlflow.db; "
               "or train without MLflow: logger=csv")
    what = reason if isinstance(err, str) else f"{type(err).__name__}: {reason}"
    return TransferError(f"cannot use the MLflow store {where}: {what}", fix)


def _artifact_location(uri: str) -> Optional[str]:
    """A SQLite store's artifacts beside the database (MLflow would otherwise pick a folder under the cwd)."""
    if not uri.startswith(SQLITE):
        return None
    return (Path(uri[len(SQLITE):]).parent / "mlartifacts").as_uri()


class MLflowRun(MLFlowLogger, ExperimentRun):
    tracker_name = "mlflow"

    def __init__(self, tracking_uri: str, ctx: TrackerContext, run_id: Optional[str] = None):
        tags = {**ctx.tags, "transfer.run_dir": str(ctx.run_dir)}
        # The store is opened and the run created (or reopened) here, while the run is being built: a store that
        # is damaged, read-only or unreachable stops the run before any training rather than at its first
        # logged metric, with the user's file left as it is (the user asked for MLflow: a run quietly missing
        # from it would be lost work, so there is no fallback to metrics.csv alone).
        try:
            tracking_uri = absolute_uri(tracking_uri)
            check_sqlite_store(tracking_uri)
            super().__init__(experiment_name=ctx.experiment, run_name=ctx.run_name, tracking_uri=tracking_uri,
                             tags=tags, artifact_location=_artifact_location(tracking_uri), run_id=run_id)
            self.experiment  # noqa: B018 - Lightning's lazy property: opens the store, creates the run
        except (MlflowException, SQLAlchemyError, OSError) as e:
            raise _store_error(tracking_uri, e) from e
        self.uri = tracking_uri
        self.resumed = run_id is not None

    def start(self, params: dict[str, Any]) -> dict[str, Any]:
        from mlflow.entities import Param, RunTag

        client, run_id = self.experiment, self.run_id
        logged = client.get_run(run_id).data.params
        values = {re.sub(r"[^\w\-./ ]", "_", key): str(value)[:PARAM_VALUE_CHARS] for key, value in params.items()}
        new = [Param(k, v) for k, v in values.items() if k not in logged]
        changed = [RunTag(RESUMED_TAG + k, v) for k, v in values.items() if k in logged and logged[k] != v]
        for start in range(0, len(new), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=new[start:start + PARAMS_PER_BATCH])
        if changed:
            client.log_batch(run_id, tags=changed)
        if self.resumed:  # Lightning marked it FINISHED (or KILLED) when the first session ended
            client.update_run(run_id, status="RUNNING")
        return {"tracking_uri": self.uri, "experiment_id": self.experiment_id, "run_id": run_id}

    def upload(self, files: Sequence[Path], checkpoint: Optional[Path]) -> None:
        for path in files:
            self.experiment.log_artifact(self.run_id, str(path))
        if checkpoint is not None:
            self.experiment.log_artifact(self.run_id, str(checkpoint), artifact_path="checkpoints")


def mlflow_logger(tracking_uri: Optional[str], ctx: TrackerContext) -> MLflowRun:
    saved = ctx.saved.get("mlflow") or {}
    if ctx.resume_step is not None and saved.get("run_id"):
        return MLflowRun(str(saved["tracking_uri"]), ctx, run_id=str(saved["run_id"]))
    return MLflowRun(tracking_uri or default_tracking_uri(), ctx)


__all__ = ["MLflowRun", "mlflow_logger", "default_tracking_uri"]
