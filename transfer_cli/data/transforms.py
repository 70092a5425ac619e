"""Preprocessing pipelines (torchvision.transforms.v2) matching what the pretrained backbone expects.

`data_config` is timm's resolve_data_config() format (input_size, interpolation, crop_pct, mean, std), with any
data.* overrides already applied, so evaluation reproduces the backbone's own ImageNet preprocessing.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, NamedTuple, Tuple

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from transfer_cli.data.augment import PRESETS, augmented_transform
from transfer_cli.errors import TransferError

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}


def interpolation_mode(name: Any) -> InterpolationMode:
    if isinstance(name, InterpolationMode):
        return name
    key = str(name).lower()
    if key == "random":  # timm's per-sample bilinear/bicubic choice; not offered here, so use the cheaper one
        key = "bilinear"
    if key not in _INTERPOLATIONS:
        raise TransferError(
            f"unknown interpolation '{name}'", f"use data.interpolation={'|'.join(_INTERPOLATIONS)}"
        )
    return _INTERPOLATIONS[key]


def _size_hw(data_config: Mapping[str, Any]) -> tuple:
    size = tuple(int(v) for v in data_config["input_size"])
    if len(size) != 3:
        raise ValueError(f"input_size must be (C, H, W), got {size}")
    return size[1], size[2]


def _to_tensor_and_normalize(data_config: Mapping[str, Any]) -> list:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[float(m) for m in data_config["mean"]], std=[float(s) for s in data_config["std"]]),
    ]


def eval_transform(data_config: Mapping[str, Any]) -> v2.Compose:
    """Resize by 1/crop_pct, then center-crop: timm's eval preprocessing for the backbone."""
    h, w = _size_hw(data_config)
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    interp = interpolation_mode(data_config.get("interpolation", "bilinear"))
    # A square input resizes the shorter side (keeping the aspect ratio), as timm does; a non-square one
    # resizes both sides, since no single shorter-side length fits both.
    scale = math.floor(h / crop_pct) if h == w else (math.floor(h / crop_pct), math.floor(w / crop_pct))
    return v2.Compose(
        [
            v2.Resize(scale, interpolation=interp, antialias=True),
            v2.CenterCrop((h, w)),
            *_to_tensor_and_normalize(data_config),
        ]
    )


def train_transform(data_config: Mapping[str, Any], aug_cfg: Any) -> v2.Compose:
    """The augmentation preset `aug_cfg.name` (data/augment.py) at the backbone's input size and normalization."""
    return augmented_transform(
        aug_cfg,
        _size_hw(data_config),
        interpolation_mode(data_config.get("interpolation", "bilinear")),
        mean=data_config["mean"],
        std=data_config["std"],
    )


def build_transform(data_config: Mapping[str, Any], aug_cfg: Any, train: bool) -> v2.Compose:
    """PIL RGB image -> normalized float32 tensor (3, H, W); train=True applies the preset `aug_cfg.name`
    (aug_cfg: the augmentation group's record; None means no augmentation)."""
    name = aug_cfg.name if aug_cfg is not None else "none"
    if name not in PRESETS:
        raise TransferError(f"unknown augmentation '{name}'", f"use augmentation={'|'.join(PRESETS)}")
    if not train or name == "none":
        return eval_transform(data_config)
    return train_transform(data_config, aug_cfg)


class Transforms(NamedTuple):
    """A run's two pipelines and the tensor shape both produce."""

    train: v2.Compose  # the augmentation preset (the eval pipeline when it is none)
    eval: v2.Compose
    image_shape: Tuple[int, int, int]  # (C, H, W)
    data_config: Dict[str, Any]  # the preprocessing they implement (timm's resolve_data_config format)

    def pick(self, augment: bool) -> v2.Compose:
        return self.train if augment else self.eval


def build_transforms(data_config: Mapping[str, Any], aug_cfg: Any) -> Transforms:
    shape = tuple(int(v) for v in data_config["input_size"])
    return Transforms(build_transform(data_config, aug_cfg, True), build_transform(data_config, aug_cfg, False),
                      shape, dict(data_config))  # type: ignore[arg-type]


__all__ = ["build_transform", "build_transforms", "Transforms", "eval_transform", "train_transform",
           "interpolation_mode"]
