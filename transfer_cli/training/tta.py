"""Test-time augmentation (eval.tta): the model sees a few views of each evaluation image, its logits averaged.

The views are made from the already preprocessed batch (resized, centre-cropped, normalized), so TTA needs no
change to the data pipeline: `hflip` adds the mirror image; `flips` the horizontal, vertical and double flips
(for images without an up or down: solar cells, microscopy, aerial views); `multicrop` adds the four corner
crops and the centre crop of side eval.multicrop_fraction, each resized back to the input size.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torchvision.transforms.v2 import functional as TF

Views = Callable[[torch.Tensor, float], list]


def _flips(images: torch.Tensor, fraction: float) -> list:
    vflip = TF.vertical_flip(images)
    return [images, TF.horizontal_flip(images), vflip, TF.horizontal_flip(vflip)]


def _multicrop(images: torch.Tensor, fraction: float) -> list:
    height, width = images.shape[-2:]
    crop = [max(1, round(height * fraction)), max(1, round(width * fraction))]
    crops = TF.five_crop(images, crop)  # top-left, top-right, bottom-left, bottom-right, centre
    return [images, *(TF.resize(c, [height, width], antialias=True) for c in crops)]


# eval.tta=<mode>: the batch as the model should see it, the unchanged batch first
VIEWS: dict[str, Views] = {
    "none": lambda images, fraction: [images],
    "hflip": lambda images, fraction: [images, TF.horizontal_flip(images)],
    "flips": _flips,
    "multicrop": _multicrop,
}


def tta_views(images: torch.Tensor, mode: str, multicrop_fraction: float = 0.875) -> list[torch.Tensor]:
    if mode not in VIEWS:
        raise ValueError(f"eval.tta must be one of {tuple(VIEWS)}, got {mode!r}")
    return VIEWS[mode](images, multicrop_fraction)


def tta_logits(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, mode: str,
               multicrop_fraction: float = 0.875, one_call: bool = False) -> torch.Tensor:
    """The mean of forward(view) over the views; one view at a time, so memory stays that of one batch.

    `one_call`: the views stacked into one batch and one forward, for a compiled network: CUDA graphs may reuse
    their output memory on the next call (a view's logits would be overwritten by the next view's), and one
    call runs one graph."""
    views = tta_views(images, mode, multicrop_fraction)
    if len(views) == 1:
        return forward(images)
    if one_call:
        logits = forward(torch.cat(views))
        return logits.view(len(views), len(images), *logits.shape[1:]).mean(dim=0)
    return torch.stack([forward(view) for view in views]).mean(dim=0)


def tta_forward(model: Callable[[torch.Tensor], torch.Tensor], mode: str,
                multicrop_fraction: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` as evaluation runs it: plain, or averaged over the views of `mode`."""
    if mode == "none":
        return model
    return partial(tta_logits, model, mode=mode, multicrop_fraction=multicrop_fraction)


def tta_for(mode: str, multicrop_fraction: float, one_call: bool = False) -> Optional[Callable]:
    """What TransferModule takes: None for no TTA, else (forward, images) -> averaged logits (`one_call`: all
    views in one forward, see tta_logits)."""
    if mode == "none":
        return None
    return partial(tta_logits, mode=mode, multicrop_fraction=multicrop_fraction, one_call=one_call)


__all__ = ["VIEWS", "tta_views", "tta_logits", "tta_forward", "tta_for"]
