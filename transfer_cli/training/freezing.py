"""Which parts of the model train, as a pure function of (epoch, transfer config), and applying it."""

from __future__ import annotations

from typing import Any

from transfer_cli.models.classifier import Classifier


def trainable_parts(transfer_cfg: Any, epoch: int) -> dict[str, bool]:
    """{"backbone": bool, "head": bool} for this epoch. The head always trains.

    `epoch` is unused by the two modes of today; schedules such as gradual unfreezing key off it, and callers
    already re-apply the result at every epoch start, which is what makes a resumed run land in the same state.
    """
    del epoch
    return {"backbone": transfer_cfg.mode != "feature_extract", "head": True}


def apply_freeze(model: Classifier, transfer_cfg: Any, epoch: int) -> dict[str, bool]:
    parts = trainable_parts(transfer_cfg, epoch)
    for name, trainable in parts.items():
        for param in getattr(model, name).parameters():
            param.requires_grad_(trainable)
    model.frozen_backbone = not parts["backbone"]
    model.train(model.training)  # re-applies BatchNorm eval mode to whatever just became frozen
    return parts
