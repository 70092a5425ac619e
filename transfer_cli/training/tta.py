"""Test-time augmentation (eval.tta): the model sees a few views of each evaluation image, its logits averaged.

The views are made from the already preprocessed batch (resized, centre-cropped, normalized), so TTA needs no
change to the data pipeline: `hflip` adds the mirror image; `flips` the horizontal, vertical and double flips
(for images without an up or down: solar cells, microscopy, aerial views); `multicrop` adds the four corner crops and the centre
crop of side eval.multicrop_fraction, each resized back to the input size.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torchvision.transforms.v2 import functional as TF

MODES = ("none", "hflip", "flips", "multicrop")


def tta_views(images: torch.Tensor, mode: str, multicrop_fraction: float = 0.875) -> list[torch.Tensor]:
    """The batch as the model should see it under `mode`, the unchanged batch first."""
    if mode == "none":
        return [images]
    if mode == "hflip":
        return [images, TF.horizontal_flip(images)]
    if mode == "flips":
        vflip = TF.vertical_flip(images)
        return [images, TF.horizontal_flip(images), vflip, TF.horizontal_flip(vflip)]
    if mode == "multicrop":
        height, width = images.shape[-2:]
        crop = [max(1, round(height * multicrop_fraction)), max(1, round(width * multicrop_fraction))]
        crops = TF.five_crop(images, crop)  # top-left, top-right, bottom-left, bottom-right, centre
        return [images, *(TF.resize(c, [height, width], antialias=True) for c in crops)]
    raise ValueError(f"eval.tta must be one of {MODES}, got {mode!r}")


def tta_logits(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, eval_cfg: Any) -> torch.Tensor:
    """The mean of forward(view) over the views; one view at a time, so memory stays that of one batch."""
    views = tta_views(images, eval_cfg.tta, eval_cfg.multicrop_fraction)
    if len(views) == 1:
        return forward(images)
    return torch.stack([forward(view) for view in views]).mean(dim=0)
