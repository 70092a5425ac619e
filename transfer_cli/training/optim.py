"""The optimizer, by name, from timm's factory over the transfer mode's parameter groups.

`opt_cfg` is the optimizer group's record (config/schema.py OptimizerConfig).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Optional

import torch

from transfer_cli.errors import TransferError, close_matches

log = logging.getLogger("transfer_cli")

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
        # names only, since with_description is off (timm's return type also covers its (name, description) pairs)
        known = [n for n in list_optimizers() if isinstance(n, str)]
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


def kernel_flags(opt_class: Callable[..., torch.optim.Optimizer], device_type: str, given: dict[str, Any],
                 clip: bool = False, mixed_precision: bool = False) -> tuple[dict[str, bool], Optional[str]]:
    """(the implementation flag this optimizer gets, why it is not the fastest one, or None).

    On CUDA a `fused` optimizer updates every parameter in a few kernels, where the default (foreach) launches
    several per parameter group and reads its step counters on the host: with small batches those launches are
    what the GPU waits for. `fused` where the class accepts it, else `foreach`. Not on other devices: torch's
    defaults there, so CPU results stay what they were. Not over the user's own `optimizer.kwargs.fused/foreach`.
    Lightning refuses to clip the gradients of a fused optimizer under mixed precision (it unscales them inside
    its step), so clipping (`clip`) with mixed precision gets foreach.
    """
    if device_type != "cuda" or "fused" in given or "foreach" in given:
        return {}, None
    accepts = inspect.signature(opt_class).parameters
    foreach = {"foreach": True} if "foreach" in accepts else {}
    if "fused" not in accepts:
        return foreach, None
    if clip and mixed_precision:
        return foreach, ("gradient clipping under mixed precision: Lightning does not clip a fused optimizer's "
                         "gradients, so the optimizer runs its foreach kernels")
    return {"fused": True}, None


def build_optimizer(groups: list[dict], opt_cfg: Any, device_type: str = "cpu", clip: bool = False,
                    mixed_precision: bool = False) -> torch.optim.Optimizer:
    """The optimizer over `groups` as given: each group keeps its own lr, weight_decay, name and lr_scale.

    `device_type`: where the parameters train; `clip`, `mixed_precision`: whether the trainer clips gradients and
    autocasts (see kernel_flags)."""
    from timm.optim import create_optimizer_v2, get_optimizer_class

    name = timm_optimizer_name(opt_cfg)
    kwargs = optimizer_kwargs(name, opt_cfg)
    flags, why = kernel_flags(get_optimizer_class(name, bind_defaults=False), device_type, kwargs, clip,
                              mixed_precision)
    if flags or why:
        log.info("optimizer %s: %s%s", name, ", ".join(f"{k}=True" for k in flags) or "default kernels",
                 f" ({why})" if why else "")
    try:
        return create_optimizer_v2(groups, opt=name, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay,
                                   **{**kwargs, **flags})  # one dict: kernel_flags sets no key of `kwargs`
    except TypeError as e:  # a +optimizer.kwargs.X this optimizer does not take
        raise TransferError(f"optimizer {name} rejected an argument: {e}", "check the names under optimizer.kwargs")
