"""What a training epoch has accumulated so far (its loss and its metrics), kept across an interruption.

Lightning restarts an interrupted epoch from its checkpoint with fresh accumulators, so the epoch's logged
train/loss_epoch and train/acc would average only the batches after the resume, and differ from the same run
left alone. The epoch's loss is accumulated here (a sum and a count on the device, no host sync), and a checkpoint
written in the middle of an epoch carries both the loss accumulator and the train metrics' states, as plain
tensors; a run restored in that epoch starts from them.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torchmetrics import MetricCollection

KEY = "transfer_epoch"  # the checkpoint entry


class EpochState:
    def __init__(self, metrics: MetricCollection):
        self.metrics = metrics
        self.batches = 0
        self._sum: Optional[torch.Tensor] = None
        self._count: Optional[torch.Tensor] = None
        self._restored: Optional[dict] = None

    def reset(self) -> None:
        self.batches, self._sum, self._count = 0, None, None

    def add(self, loss: torch.Tensor, n: int) -> None:
        value = loss.detach().float() * n
        self._sum = value if self._sum is None else self._sum + value
        count = torch.full((), n, dtype=torch.long, device=loss.device)
        self._count = count if self._count is None else self._count + count
        self.batches += 1  # counted here, in the step: a checkpoint written after this batch includes it

    def mean_loss(self) -> Optional[torch.Tensor]:
        if self._sum is None:
            return None
        assert self._count is not None  # add() and apply() set the sum and the count together
        return self._sum / self._count

    def saved(self, epoch: int, epoch_batches: Any) -> Optional[dict]:
        """The checkpoint entry when the epoch is under way (neither before its first batch nor done)."""
        if not (0 < self.batches and (not isinstance(epoch_batches, int) or self.batches < epoch_batches)):
            return None
        return {"epoch": int(epoch), "batches": self.batches,
                "loss_sum": None if self._sum is None else self._sum.detach().cpu(),
                "count": None if self._count is None else self._count.detach().cpu(),
                "metrics": {name: {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                                   for k, v in metric.metric_state.items()}
                            for name, metric in self.metrics.items()}}

    def restore_later(self, entry: Optional[dict]) -> None:
        self._restored = entry

    def apply(self, epoch: int, device: torch.device) -> None:
        """At train start: continue the epoch the checkpoint was written in, if the run resumes in it."""
        entry, self._restored = self._restored, None
        if entry is None or int(entry["epoch"]) != int(epoch):
            return
        self.batches = int(entry["batches"])
        self._sum = None if entry["loss_sum"] is None else entry["loss_sum"].to(device)
        self._count = None if entry["count"] is None else entry["count"].to(device)
        for name, metric in self.metrics.items():
            metric.reset()
            metric.merge_state({k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                                for k, v in entry["metrics"].get(name, {}).items()})


__all__ = ["EpochState", "KEY"]
