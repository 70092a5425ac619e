"""The training criterion, by task and recipe: label smoothing, class weights, soft (mixed) targets."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from transfer_cli.errors import TransferError

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


def _binary_cross_entropy(cfg: Any) -> Criterion:
    """task=multilabel: an independent yes/no per label, on (N, C) float multi-hot targets."""
    aug = cfg.augmentation
    mixing = float(aug.mix_prob) > 0 and (float(aug.mixup_alpha) > 0 or float(aug.cutmix_alpha) > 0)
    unsupported = [name for name, on in (("data.class_weights", cfg.data.class_weights != "none"),
                                         ("augmentation.label_smoothing", float(aug.label_smoothing) > 0),
                                         ("augmentation mixup/cutmix", mixing)) if on]
    if unsupported:  # each is defined over one class per image here
        raise TransferError(
            f"task=multilabel does not support {', '.join(unsupported)} yet",
            "drop them: data.class_weights=none augmentation.label_smoothing=0 augmentation.mixup_alpha=0 "
            "augmentation.cutmix_alpha=0",
        )
    return F.binary_cross_entropy_with_logits


def build_criterion(cfg: Any, num_classes: int, class_counts: Optional[Sequence[int]] = None) -> Criterion:
    """(logits, target) -> loss for the run's task; targets are class indices or (N, C) probabilities."""
    task = OmegaConf.select(cfg, "task", default="multiclass")
    setting = OmegaConf.select(cfg, "data.class_weights", default="none")
    smoothing = float(OmegaConf.select(cfg, "augmentation.label_smoothing", default=0.0))
    if task == "multiclass":
        return _cross_entropy(class_weights(setting, class_counts, num_classes), smoothing)
    if task == "multilabel":
        return _binary_cross_entropy(cfg)
    raise TransferError(f"no loss for task={task}", "use task=multiclass or task=multilabel")


__all__ = ["Criterion", "build_criterion", "class_weights"]
