"""The pruning callback of `transfer tune`: Optuna's judgement after every validation epoch.

optuna-integration's PyTorchLightningPruningCallback subclasses `lightning.pytorch.Callback`, which a
`pytorch_lightning.Trainer` does not accept; this one uses only the trial's public `report` / `should_prune`.
"""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl


class PruneOnMonitor(pl.Callback):
    """Reports callbacks.monitor to the trial after each validation; stops the fit when the pruner says so."""

    def __init__(self, trial: Any, monitor: str):
        self.trial, self.monitor = trial, monitor
        self.pruned_at: Optional[int] = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        self.trial.report(float(value), step=trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned_at = trainer.current_epoch
            trainer.should_stop = True  # the run ends cleanly: checkpoints, summary and curves as usual


__all__ = ["PruneOnMonitor"]
