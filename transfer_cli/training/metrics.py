"""The metrics of each stage (train/val/test), by task, as torchmetrics collections logged as `<stage>/<name>`.

multiclass: acc (top-1). multilabel: mAP (macro average precision, val/test only), f1 (macro) and f1_micro at
`multilabel_threshold`, and acc = exact match (the whole label set right), so a val/acc monitor works for both.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MultilabelAveragePrecision,
    MultilabelExactMatch,
    MultilabelF1Score,
)

from transfer_cli.errors import TransferError

STAGES = ("train", "val", "test")


def check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 < threshold < 1.0:
        raise TransferError(
            f"multilabel_threshold={threshold} is not a probability strictly between 0 and 1",
            "predict a label when its sigmoid reaches e.g. multilabel_threshold=0.5",
        )
    return threshold


class PresentLabelsAveragePrecision(MultilabelAveragePrecision):
    """Average precision per label, averaged over the labels that have a positive in the data seen.

    AP is undefined for a label without positives and torchmetrics scores it 0, so a validation split that
    happens to miss a rare label would lower mAP for a reason that has nothing to do with the model.
    """

    positives: torch.Tensor  # a metric state (add_state), which nn.Module's __getattr__ would type as Tensor | Module

    def __init__(self, num_labels: int):
        super().__init__(num_labels=num_labels, average=None)
        self.add_state("positives", default=torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds, target)
        self.positives += target.sum(0).long()

    # As torchmetrics' own MultilabelAveragePrecision.compute: its base class computes curves (a tuple), AP a tensor.
    def compute(self) -> torch.Tensor:  # type: ignore[override]
        with warnings.catch_warnings():  # the labels it warns about are the ones left out below
            warnings.filterwarnings("ignore", message="No positive samples found in target")
            per_label = super().compute()
        present = self.positives > 0
        return per_label[present].mean() if present.any() else torch.tensor(float("nan"))


class LabelSetMetrics(MetricCollection):
    """Multi-label metrics, fed with logits and multi-hot targets like the criterion.

    Probabilities are taken here: torchmetrics applies the sigmoid only when some value lies outside [0, 1],
    which would let the F1 threshold mean different things from batch to batch. Targets become hard 0/1 labels:
    average precision takes nothing else, and soft targets (smoothing, mixing) count as the labels they hold
    at 0.5 or more.
    """

    @staticmethod
    def _prepare(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits.float().sigmoid(), (target >= 0.5).long()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
        return super().forward(*self._prepare(logits, target))

    # MetricCollection reuses ModuleDict's method name `update` for feeding its metrics (its own update(*args)
    # overrides ModuleDict.update(modules) the same way).
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        super().update(*self._prepare(logits, target))


def _class_metrics(num_classes: int, stage: str, threshold: float) -> MetricCollection:
    return MetricCollection({"acc": MulticlassAccuracy(num_classes=num_classes, average="micro")}, prefix=f"{stage}/")


def _label_metrics(num_classes: int, stage: str, threshold: float) -> MetricCollection:
    threshold = check_threshold(threshold)
    # zero_division=1: a label that is neither present nor predicted was handled perfectly, not failed.
    label_metrics: dict[str, Metric | MetricCollection] = {  # the value type MetricCollection takes
        "acc": MultilabelExactMatch(num_labels=num_classes, threshold=threshold),
        "f1": MultilabelF1Score(num_labels=num_classes, threshold=threshold, average="macro", zero_division=1.0),
        "f1_micro": MultilabelF1Score(num_labels=num_classes, threshold=threshold, average="micro", zero_division=1.0),
    }
    # Exact AP keeps every score of the epoch; train scores come from augmented images anyway, so train skips it.
    if stage != "train":
        label_metrics["mAP"] = PresentLabelsAveragePrecision(num_labels=num_classes)
    return LabelSetMetrics(label_metrics, prefix=f"{stage}/")


# task=<name>: the metrics of one stage, given the class count and the multi-label threshold
TASK_METRICS = {"multiclass": _class_metrics, "multilabel": _label_metrics}


def stage_metrics(task: str, num_classes: int, stage: str, threshold: float = 0.5) -> MetricCollection:
    return TASK_METRICS[task](num_classes, stage, threshold)


def build_metrics(task: str, num_classes: int, threshold: float = 0.5) -> nn.ModuleDict:
    # ModuleDict keys cannot be "train" (it would shadow nn.Module.train), hence the suffix.
    return nn.ModuleDict({f"{stage}_metrics": stage_metrics(task, num_classes, stage, threshold) for stage in STAGES})
