"""logger=wandb: Lightning's WandbLogger in the run dir, offline unless WANDB_MODE says otherwise.

Offline needs no account and no network; `wandb sync <run dir>/wandb/offline-run-*` uploads a run later. The
config goes to the run's config, the run's files are saved with it, and a resume reopens the same run id (W&B
writes each session into its own offline-run folder; `wandb sync` merges them into one run).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from pytorch_lightning.loggers import WandbLogger

from transfer_cli.tracking.tracker_run import ExperimentRun, TrackerContext


def wandb_mode() -> str:
    return os.environ.get("WANDB_MODE") or "offline"


class WandbRun(WandbLogger, ExperimentRun):
    tracker_name = "wandb"

    def __init__(self, ctx: TrackerContext, run_id: Optional[str] = None):
        # mode goes to wandb.init; WandbLogger's own offline=True would set WANDB_MODE for the whole process
        super().__init__(name=ctx.run_name, save_dir=str(ctx.run_dir), id=run_id, project=ctx.experiment,
                         mode=wandb_mode(), tags=[f"{k}={v}" for k, v in ctx.tags.items()] or None)
        self.run_dir = Path(ctx.run_dir)

    def start(self, params: dict[str, Any]) -> dict[str, Any]:
        run = self.experiment
        run.config.update(params, allow_val_change=True)  # a resume may extend trainer.max_epochs
        return {"id": run.id, "project": run.project, "mode": wandb_mode(), "dir": str(run.dir)}

    def upload(self, files: Sequence[Path], checkpoint: Optional[Path]) -> None:
        import wandb

        run = self.experiment
        for path in files:
            run.save(str(path), base_path=str(self.run_dir), policy="now")
        if checkpoint is not None:
            artifact = wandb.Artifact(f"model-{run.id}", type="model")
            artifact.add_file(str(checkpoint))
            run.log_artifact(artifact, aliases=["best"])

    def close(self) -> None:
        if self._experiment is not None:  # else a later run in this process would log into this one
            self._experiment.finish()
            self._experiment = None


def wandb_logger(ctx: TrackerContext) -> WandbRun:
    saved = ctx.saved.get("wandb") or {}
    return WandbRun(ctx, run_id=str(saved["id"]) if ctx.resume_step is not None and saved.get("id") else None)


__all__ = ["WandbRun", "wandb_logger", "wandb_mode"]
