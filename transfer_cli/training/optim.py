"""The optimizer, by name, from timm's factory over the transfer mode's parameter groups.

`opt_cfg` is the optimizer group's record (config/schema.py OptimizerConfig).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from transfer_cli.errors import TransferError, close_matches

# optimizer=<name>: timm's name for it. SGD is one config with a nesterov switch; timm spells the variants apart.
OPTIMIZERS: dict[str, Callable[[Any], str]] = {
    "sgd": lambda cfg: "nesterov" if cfg.nesterov else "momentum",
    "adamw": lambda cfg: "adamw",
    "adam": lambda cfg: "adam",
    "rmsprop": lambda cfg: "rmsprop",
    "lamb": lambda cfg: "lamb",
    "lion": lambda cfg: "lion",
}


def timm_optimizer_name(opt_cfg: Any) -> str:
    """The timm optimizer that `optimizer.name` (or `optimizer.timm_opt`) chooses, checked against timm's list."""
    from timm.optim import list_optimizers

    if opt_cfg.timm_opt:
        name = str(opt_cfg.timm_opt).lower()
        known = list_optimizers()
        if name not in known:
            matches = close_matches(name, known)
            hint = f"did you mean {' or '.join(matches)}? " if matches else ""
            raise TransferError(
                f"optimizer.timm_opt={opt_cfg.timm_opt} is not a timm optimizer",
                f"{hint}any name of timm.optim.list_optimizers(), or optimizer.timm_opt=null with optimizer.name",
            )
        return name
    return OPTIMIZERS[opt_cfg.name](opt_cfg)


def optimizer_kwargs(name: str, opt_cfg: Any) -> dict[str, Any]:
    """The config's hyper-parameters that this optimizer takes (timm records which ones each accepts)."""
    from timm.optim import get_optimizer_info

    info = get_optimizer_info(name)
    kwargs: dict[str, Any] = {}
    if info.has_momentum:
        kwargs["momentum"] = opt_cfg.momentum
    if info.has_betas:
        kwargs["betas"] = tuple(opt_cfg.betas)
    if info.has_eps:
        kwargs["eps"] = opt_cfg.eps
    kwargs.update(opt_cfg.kwargs or {})
    return kwargs


def build_optimizer(groups: list[dict], opt_cfg: Any) -> torch.optim.Optimizer:
    """The optimizer over `groups` as given: each group keeps its own lr, weight_decay, name and lr_scale."""
    from timm.optim import create_optimizer_v2

    name = timm_optimizer_name(opt_cfg)
    kwargs = optimizer_kwargs(name, opt_cfg)
    try:
        return create_optimizer_v2(groups, opt=name, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay, **kwargs)
    except TypeError as e:  # a +optimizer.kwargs.X this optimizer does not take
        raise TransferError(f"optimizer {name} rejected an argument: {e}", "check the names under optimizer.kwargs")
