"""The inputs an exported network is checked on against the checkpoint's (export, and the timm folder of push).

Two batch sizes, neither the one the network is exported with, so the check also covers the dynamic batch axis;
random pixels through the run's real mean and std, so the logits compared have realistic ranges.
"""

from __future__ import annotations

from typing import Any

CHECK_BATCHES = (1, 3)


def sample_inputs(metadata: dict, batch: int, seed: int) -> Any:
    """Normalized random images: uniform pixels through the real mean/std, so logits have realistic ranges."""
    import torch

    channels, height, width = metadata["input_size"]
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand((batch, channels, height, width), generator=generator)
    mean = torch.tensor(metadata["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(metadata["std"]).view(1, -1, 1, 1)
    return (pixels - mean) / std


__all__ = ["CHECK_BATCHES", "sample_inputs"]
