"""The metrics of each stage (train/val/test), by task, as torchmetrics collections logged as `<stage>/<name>`."""

from __future__ import annotations

from typing import Any

from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

STAGES = ("train", "val", "test")


def stage_metrics(cfg: Any, num_classes: int, stage: str) -> MetricCollection:
    metrics = {"acc": MulticlassAccuracy(num_classes=num_classes, average="micro")}
    return MetricCollection(metrics, prefix=f"{stage}/")


def build_metrics(cfg: Any, num_classes: int) -> nn.ModuleDict:
    # ModuleDict keys cannot be "train" (it would shadow nn.Module.train), hence the suffix.
    return nn.ModuleDict({f"{stage}_metrics": stage_metrics(cfg, num_classes, stage) for stage in STAGES})
