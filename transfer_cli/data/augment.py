"""Training-time augmentation presets (torchvision.transforms.v2) on top of the backbone's preprocessing.

The preset (`augmentation.name`) is a starting point: `light` crops and flips, `medium` adds photometric and
small geometric changes, the automatic policies (RandAugment, TrivialAugment, AutoAugment) add theirs after the
crop. The knobs (flips, rot90, colour jitter, rotation, perspective, noise, random erasing) apply to every preset
but `none`, e.g. `augmentation=randaugment augmentation.rot90=0.75`. Output size and normalization always come
from the backbone's data config, so training images match what the model sees at evaluation.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

# augmentation=<name>: the op a preset adds after the crop, flips and the knobs (none: no augmentation at all,
# the evaluation preprocessing; light and medium differ only in the knob values their YAML files set). Each is
# given (aug_cfg, fill); BILINEAR because the automatic policies' default (NEAREST) makes jagged edges.
PRESETS: Dict[str, Optional[Callable[[Any, list], v2.Transform]]] = {
    "none": None,
    "light": None,
    "medium": None,
    "randaugment": lambda cfg, fill: v2.RandAugment(
        num_ops=int(cfg.num_ops), magnitude=int(cfg.magnitude), interpolation=InterpolationMode.BILINEAR, fill=fill
    ),
    "trivialaugment": lambda cfg, fill: v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR, fill=fill),
    "autoaugment": lambda cfg, fill: v2.AutoAugment(
        v2.AutoAugmentPolicy.IMAGENET, interpolation=InterpolationMode.BILINEAR, fill=fill
    ),
}


class RandomRot90(v2.Transform):
    """With probability p, a rotation by 90, 180 or 270 degrees (exact: no resampling, no fill).

    p=0.75 makes all four orientations equally likely; with hflip=0.5 too, all eight symmetries of the square,
    which is the right prior for solar cells, microscopy, satellite tiles and other views without an 'up'.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def make_params(self, flat_inputs: list) -> dict:
        turns = int(torch.randint(1, 4, ())) if float(torch.rand(())) < self.p else 0
        return {"turns": turns}

    def transform(self, inpt: Any, params: dict) -> Any:
        if params["turns"] == 0:
            return inpt
        return TF.rotate(inpt, 90.0 * params["turns"], expand=True)


def augmented_transform(
    aug_cfg: Any,
    size: Tuple[int, int],
    interpolation: InterpolationMode,
    mean: Sequence[float],
    std: Sequence[float],
) -> v2.Compose:
    """PIL RGB image -> augmented, normalized float32 tensor (3, *size), for any preset but `none`."""
    # Pixels that geometric ops uncover get the mean colour, i.e. zero after normalization: no new signal.
    fill = [round(255 * m) for m in mean]
    ops: list = []
    if float(aug_cfg.rot90) > 0:  # before the crop, so a non-square input size keeps its shape
        ops.append(RandomRot90(float(aug_cfg.rot90)))
    ops.append(
        v2.RandomResizedCrop(
            size,
            scale=tuple(float(s) for s in aug_cfg.scale),
            ratio=tuple(float(r) for r in aug_cfg.ratio),
            interpolation=interpolation,
            antialias=True,
        )
    )
    if float(aug_cfg.hflip) > 0:
        ops.append(v2.RandomHorizontalFlip(float(aug_cfg.hflip)))
    if float(aug_cfg.vflip) > 0:
        ops.append(v2.RandomVerticalFlip(float(aug_cfg.vflip)))
    # Small geometric changes after the crop: cheaper at the final size, and the crop cannot undo them.
    if float(aug_cfg.rotation) > 0:
        ops.append(v2.RandomRotation(float(aug_cfg.rotation), interpolation=InterpolationMode.BILINEAR, fill=fill))
    if float(aug_cfg.perspective) > 0:
        ops.append(v2.RandomPerspective(float(aug_cfg.perspective), p=0.5, fill=fill))
    if float(aug_cfg.color_jitter) > 0:
        # No hue shift: it changes what things are (rust vs paint) more often than it teaches invariance.
        # Saturation leaves grayscale-origin images (R = G = B) unchanged, so this is safe for them.
        strength = float(aug_cfg.color_jitter)
        ops.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
    policy = PRESETS[aug_cfg.name]
    if policy is not None:
        ops.append(policy(aug_cfg, fill))
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if float(aug_cfg.noise_std) > 0:
        ops.append(v2.GaussianNoise(sigma=float(aug_cfg.noise_std), clip=True))  # in [0, 1] pixel units
    ops.append(v2.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std]))
    if float(aug_cfg.random_erasing) > 0:
        # value=0 after Normalize is the mean colour: the erased patch carries no texture that could pass for
        # a defect, unlike per-pixel noise.
        ops.append(v2.RandomErasing(p=float(aug_cfg.random_erasing), value=0))
    return v2.Compose(ops)


__all__ = ["PRESETS", "RandomRot90", "augmented_transform"]
