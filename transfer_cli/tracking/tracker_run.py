"""What a tracker with a run of its own (MLflow, W&B) implements, and what it is given: the base the tracker
modules share with the registry in trackers.py, which imports each of them only when its flag is on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence


@dataclass
class TrackerContext:
    """What a tracker needs besides the logger group: where the run lives and whether it continues."""

    run_dir: Path
    experiment: str  # the MLflow experiment / W&B project
    run_name: str
    tags: dict[str, str] = field(default_factory=dict)
    resume_step: Optional[int] = None  # the optimizer step a resumed run continues from; None: a new run
    saved: dict[str, dict] = field(default_factory=dict)  # trackers.json of the run being resumed


class ExperimentRun:
    """A tracker with a run of its own outside the run dir (implemented by the MLflow and W&B loggers)."""

    tracker_name = ""

    def start(self, params: dict[str, Any]) -> dict[str, Any]:
        """Log the resolved config (flattened); return the ids that find this run again (for trackers.json)."""
        raise NotImplementedError

    def upload(self, files: Sequence[Path], checkpoint: Optional[Path]) -> None:
        """The run dir's result files, and the checkpoint when logger.log_model is set."""
        raise NotImplementedError

    def close(self) -> None:
        """End this process's connection to the run (a resume may reopen it)."""


__all__ = ["TrackerContext", "ExperimentRun"]
