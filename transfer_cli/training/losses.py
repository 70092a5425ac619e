"""The training criterion, by task and recipe: label smoothing, class weights, soft (mixed) targets."""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger("transfer_cli")

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def class_weights(setting: str, class_counts: Optional[Sequence[int]], num_classes: int) -> Optional[torch.Tensor]:
    """data.class_weights=auto: n / (C x n_c) per class (inverse frequency, scaled so the average training sample
    weighs 1 and the loss keeps its usual size); none: None."""
    if setting == "none":
        return None
    if class_counts is None:  # e.g. a module rebuilt from a checkpoint for evaluation: accuracy is unaffected
        log.warning("data.class_weights=%s: no class counts given, so the loss is unweighted", setting)
        return None
    counts = torch.as_tensor(list(class_counts), dtype=torch.float32)
    if counts.numel() != num_classes:
        raise ValueError(f"class_counts has {counts.numel()} entries for {num_classes} classes")
    # A class without training samples gets the weight of a class with one: it never occurs as a hard target.
    return counts.sum() / (num_classes * counts.clamp(min=1))


def _cross_entropy(weight: Optional[torch.Tensor], label_smoothing: float) -> Criterion:
    def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = None if weight is None else weight.to(device=logits.device, dtype=logits.dtype)
        if target.is_floating_point():  # soft targets from Mixup/CutMix, which already hold the smoothing
            return F.cross_entropy(logits, target, weight=w)
        return F.cross_entropy(logits, target, weight=w, label_smoothing=label_smoothing)

    return cross_entropy


def multilabel_conflicts(class_weights: str, label_smoothing: float, mixing: bool) -> list[str]:
    """Options defined over one class per image, which task=multilabel cannot honour (yet)."""
    return [name for name, on in (("data.class_weights", class_weights != "none"),
                                  ("augmentation.label_smoothing", float(label_smoothing) > 0),
                                  ("augmentation mixup/cutmix", mixing)) if on]


def _binary_cross_entropy(weight: Optional[torch.Tensor], label_smoothing: float) -> Criterion:
    """task=multilabel: an independent yes/no per label, on (N, C) float multi-hot targets."""
    return F.binary_cross_entropy_with_logits


# task=<name>: the loss of (logits, targets), given class weights (None: unweighted) and the label smoothing
CRITERIA: dict[str, Callable[[Optional[torch.Tensor], float], Criterion]] = {
    "multiclass": _cross_entropy,
    "multilabel": _binary_cross_entropy,
}


def build_criterion(task: str, weight: Optional[torch.Tensor] = None, label_smoothing: float = 0.0) -> Criterion:
    """(logits, target) -> loss for the run's task; targets are class indices or (N, C) probabilities."""
    return CRITERIA[task](weight, label_smoothing)


__all__ = ["Criterion", "CRITERIA", "build_criterion", "class_weights", "multilabel_conflicts"]
