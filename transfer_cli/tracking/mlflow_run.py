"""logger=mlflow: Lightning's MLFlowLogger, plus the config as params, the run's files as artifacts, and resume.

The store is `logger.tracking_uri`, else $MLFLOW_TRACKING_URI, else a SQLite file `outputs/mlflow.db` under the
folder the command runs from (MLflow's own default backend is SQLite too); a SQLite store keeps its artifacts in
`mlartifacts/` beside the database. A resumed run reopens the MLflow run kept in trackers.json, so its metric
steps continue where the checkpoint left off (MLflow cannot delete values, so steps that an interrupted run
logged after its last checkpoint appear twice in MLflow's history; metrics.csv drops them).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence

from mlflow.exceptions import MlflowException
from pytorch_lightning.loggers import MLFlowLogger

try:
    from sqlalchemy.exc import SQLAlchemyError
except ImportError:  # mlflow-skinny: no SQL stores, so no SQLAlchemy and none of its errors
    SQLAlchemyError = MlflowException  # type: ignore[misc,assignment]

from transfer_cli.tracking.mlflow_store import SQLITE, check_sqlite_store, default_tracking_uri, run_store, store_error
from transfer_cli.tracking.tracker_run import ExperimentRun, TrackerContext

PARAM_VALUE_CHARS = 500  # every MLflow since 1.28 stores this much of a param value
PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
RESUMED_TAG = "resumed."  # a param a resume changed (MLflow params never change): its new value as a tag


def absolute_uri(uri: str) -> str:
    """A SQLite store by its absolute path, so a resume from another folder finds the same database."""
    if not uri.startswith(SQLITE):
        return uri
    db = Path(uri[len(SQLITE):]).expanduser().resolve()
    db.parent.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
    return f"{SQLITE}{db}"


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
            raise store_error(tracking_uri, e) from e
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
    return MLflowRun(run_store(tracking_uri), ctx)


__all__ = ["MLflowRun", "mlflow_logger", "default_tracking_uri"]
