"""The training criterion, by task and recipe."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build_criterion(cfg: Any, num_classes: int) -> Criterion:
    del cfg, num_classes
    return F.cross_entropy
