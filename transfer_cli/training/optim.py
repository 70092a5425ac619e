"""Parameter groups, the optimizer (timm's factory), and the LR schedule as a pure function of the step."""

from __future__ import annotations

import math
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


def build_optimizer(groups: list[dict], opt_cfg: Any) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    kwargs: dict[str, Any] = {}
    if opt_cfg.name == "sgd":
        opt = "sgd" if opt_cfg.nesterov else "momentum"  # timm's names for SGD with / without Nesterov
        kwargs["momentum"] = opt_cfg.momentum
    else:
        opt = opt_cfg.name
        kwargs.update(betas=tuple(opt_cfg.betas), eps=opt_cfg.eps)
    return create_optimizer_v2(groups, opt=opt, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay, **kwargs)


def lr_factor(step: int, sched_cfg: Any, steps_per_epoch: float, total_steps: int) -> float:
    """The multiplier of every group's base LR after `step` optimizer steps: linear warmup, then the decay.

    Depends only on (step, config, run length), so a resumed or extended run follows the config exactly.
    """
    warmup = sched_cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        start = sched_cfg.warmup_start_factor
        return start + (1.0 - start) * step / warmup
    name = sched_cfg.name
    if name == "cosine":
        span = max(1.0, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        floor = sched_cfg.min_lr_factor
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    epoch = int(step // steps_per_epoch) if steps_per_epoch > 0 else 0
    if name == "step":
        return sched_cfg.gamma ** (epoch // max(1, sched_cfg.step_epochs))
    if name == "exponential":
        return sched_cfg.gamma**epoch
    return 1.0  # none: constant


def build_scheduler(
    optimizer: torch.optim.Optimizer, sched_cfg: Any, steps_per_epoch: float, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:  # a plain function: LambdaLR pickles nothing of it into checkpoints
        return lr_factor(step, sched_cfg, steps_per_epoch, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
