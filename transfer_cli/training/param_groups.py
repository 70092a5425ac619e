"""Optimizer parameter groups: which parameters train together, at which LR scale and weight decay."""

from __future__ import annotations

import torch

from transfer_cli.models.classifier import Classifier
from transfer_cli.training.freezing import FreezePlan


def _no_decay(name: str, param: torch.Tensor, skip: set[str]) -> bool:
    # Biases and normalization scales/shifts are 1-D; decaying them hurts and is not what the recipes do.
    return param.ndim <= 1 or name.endswith(".bias") or name in skip


def param_groups(model: Classifier, plan: FreezePlan, lr: float, weight_decay: float) -> list[dict]:
    """One group per (stage, decay or not) plus the head's, each with lr = `lr` x its stage's scale.

    Built once for the whole run: every stage that trains in *any* epoch (gradual unfreezing included) has its
    group from the start, and a stage frozen for now simply has no gradients, so the optimizer (and a resumed
    optimizer state) never changes shape. Stages that never train get no group. Names and scales travel in the
    groups so the audit, the LR monitor and the tests can read them back.
    """
    stages = model.stages
    ever = plan.ever_trainable()
    scales = plan.lr_scales()
    named = dict(model.backbone.named_parameters())
    skip = set(getattr(model.backbone, "no_weight_decay", lambda: set())())
    parts = [(f"backbone.{s.name}", [(n, named[n]) for n in s.params if n in ever], scales[s.name], skip)
             for s in stages]
    parts.append(("head", list(model.head.named_parameters()), 1.0, set()))
    groups = []
    for part, params, scale, no_wd in parts:
        decay = [p for n, p in params if not _no_decay(n, p, no_wd)]
        no_decay = [p for n, p in params if _no_decay(n, p, no_wd)]
        for suffix, chosen, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
            if chosen:
                groups.append({"name": f"{part}/{suffix}", "params": chosen, "lr": lr * scale,
                               "lr_scale": scale, "weight_decay": wd})
    return groups
