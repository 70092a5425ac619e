"""The optimizer, by name, from timm's factory over the transfer mode's parameter groups."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf

from transfer_cli.errors import TransferError

# Our names for timm's: SGD is one config with a nesterov switch, timm spells the two variants differently.
_SGD = {True: "nesterov", False: "momentum"}


def timm_optimizer_name(opt_cfg: Any) -> str:
    """The timm optimizer that `optimizer.name` (or `optimizer.timm_opt`) chooses, checked against timm's list."""
    from timm.optim import list_optimizers

    if opt_cfg.timm_opt:
        name = str(opt_cfg.timm_opt).lower()
        known = list_optimizers()
        if name not in known:
            from transfer_cli.config.compose import close_matches

            matches = close_matches(name, known)
            hint = f"did you mean {' or '.join(matches)}? " if matches else ""
            raise TransferError(
                f"optimizer.timm_opt={opt_cfg.timm_opt} is not a timm optimizer",
                f"{hint}any name of timm.optim.list_optimizers(), or optimizer.timm_opt=null with optimizer.name",
            )
        return name
    if opt_cfg.name == "sgd":
        return _SGD[bool(opt_cfg.nesterov)]
    return str(opt_cfg.name)


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
    extra = opt_cfg.kwargs or {}
    if not isinstance(extra, dict):
        extra = OmegaConf.to_container(extra, resolve=True)
    kwargs.update(extra)
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
