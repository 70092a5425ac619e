"""The optimizer, by name, from timm's factory over the transfer mode's parameter groups."""

from __future__ import annotations

from typing import Any

import torch


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
