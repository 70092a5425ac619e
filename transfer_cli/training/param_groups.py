"""Optimizer parameter groups: which parameters train together, at which LR scale and weight decay."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from transfer_cli.models.classifier import Classifier


def _no_decay(name: str, param: torch.Tensor, skip: set[str]) -> bool:
    # Biases and normalization scales/shifts are 1-D; decaying them hurts and is not what the recipes do.
    return param.ndim <= 1 or name.endswith(".bias") or name in skip


def _split_decay(module: nn.Module, skip: set[str]) -> tuple[list, list]:
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        (no_decay if _no_decay(name, param, skip) else decay).append(param)
    return decay, no_decay


def param_groups(model: Classifier, transfer_cfg: Any, opt_cfg: Any) -> list[dict]:
    """One group per (part of the model, decay or not), each with its own lr = optimizer.lr x lr_scale.

    A part that the transfer mode never trains gets no group. Names and scales travel in the groups so the
    audit, the LR monitor and the tests can read them back.
    """
    parts: list[tuple[str, nn.Module, float]] = [("head", model.head, 1.0)]
    if transfer_cfg.mode != "feature_extract":
        parts.insert(0, ("backbone", model.backbone, float(transfer_cfg.backbone_lr_scale)))
    skip = set(getattr(model.backbone, "no_weight_decay", lambda: set())())
    groups = []
    for part, module, scale in parts:
        decay, no_decay = _split_decay(module, skip if part == "backbone" else set())
        for suffix, params, wd in (("decay", decay, opt_cfg.weight_decay), ("no_decay", no_decay, 0.0)):
            if params:
                groups.append(
                    {"name": f"{part}/{suffix}", "params": params, "lr": opt_cfg.lr * scale, "lr_scale": scale,
                     "weight_decay": wd}
                )
    return groups
