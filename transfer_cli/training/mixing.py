"""Mixup / CutMix of training batches with timm's Mixup, which also turns labels into (smoothed) soft targets."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target


def build_mixup(aug_cfg: Any, num_classes: int) -> Optional[Mixup]:
    """timm's Mixup from augmentation.{mixup_alpha, cutmix_alpha, mix_prob, switch_prob, label_smoothing}, or
    None when neither mixup nor cutmix is on."""
    mixup_alpha, cutmix_alpha = float(aug_cfg.mixup_alpha), float(aug_cfg.cutmix_alpha)
    if float(aug_cfg.mix_prob) <= 0 or (mixup_alpha <= 0 and cutmix_alpha <= 0):
        return None
    return Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        prob=float(aug_cfg.mix_prob),
        switch_prob=float(aug_cfg.switch_prob),
        mode="batch",
        label_smoothing=float(aug_cfg.label_smoothing),
        num_classes=num_classes,
    )


def mix_batch(mixup: Mixup, images: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mixed images, soft targets (N, C)) of a batch.

    Mixup pairs each sample with its mirror in the batch and needs an even count; an odd batch (the last one, or
    one that lost an unreadable image) mixes all but its last sample, which keeps its own smoothed target.
    """
    n = len(target)
    if n == 0:  # the step skips empty batches
        return images, target
    even = n - n % 2
    if even == n:
        return mixup(images, target)
    rest = mixup_target(target[even:], mixup.num_classes, 1.0, mixup.label_smoothing, mixup.multi_label)
    if even == 0:
        return images, rest
    mixed, soft = mixup(images[:even], target[:even])
    return torch.cat([mixed, images[even:]]), torch.cat([soft, rest])


__all__ = ["build_mixup", "mix_batch"]
