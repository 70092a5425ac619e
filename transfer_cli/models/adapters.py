"""Low-rank adapters (LoRA) on a backbone through the peft library, and merging them back into its weights.

peft's `inject_adapter_in_model` replaces each targeted layer in place by a LoRA layer that holds the original
as `base_layer`, so the backbone stays the timm module it was: timm's stage grouping, `no_weight_decay` and the
feature pass keep working, and the adapters' parameters (`<layer>.lora_A.default.weight`, `...lora_B...`) fall
into the stage of their layer. peft's own `merge_and_unload` belongs to its model wrappers (PeftModel,
LoraModel), which we do not use for that reason; `merge_adapters` does the same with the public API of each
layer (BaseTunerLayer.merge and get_base_layer), leaving a plain timm backbone whose state dict timm loads.
This module is the only one that imports peft.
"""

from __future__ import annotations

import re
from typing import Sequence

from torch import nn

from transfer_cli.errors import TransferError
from transfer_cli.models.stages import Stage

ADAPTER = "default"  # peft's adapter name: one adapter per backbone
_ADAPTER_PARAM = re.compile(rf"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.{ADAPTER}(\.|$)")


def is_adapter_param(name: str) -> bool:
    """Whether a backbone parameter name is an adapter's (the rest are the frozen original weights)."""
    return _ADAPTER_PARAM.search(name) is not None


def _adaptable(module: nn.Module) -> bool:
    # Linear layers and ungrouped convolutions: peft's Conv2d LoRA needs the rank divisible by `groups`, which a
    # depthwise convolution (groups = channels) rules out.
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def adapter_targets(backbone: nn.Module, stages: Sequence[Stage], patterns: Sequence[str],
                    frozen_stages: int) -> list[str]:
    """Full names of the modules that get an adapter. `patterns` (regexes, searched in the module names) choose
    them; with none, every adaptable module outside the stem and the first `frozen_stages` stages."""
    stage_of = {p.rpartition(".")[0]: s.index for s in stages for p in s.params}
    adaptable = [name for name, module in backbone.named_modules() if name and _adaptable(module)]
    if not adaptable:
        raise TransferError("transfer=lora: this backbone has no Linear or ungrouped Conv2d layer for an adapter",
                            "transfer=fine_tune or transfer=partial")
    if not patterns:
        chosen = [n for n in adaptable if stage_of.get(n, 0) > max(frozen_stages, 0)]
        if not chosen:
            raise TransferError(f"transfer=lora: no adaptable layer lies above the stem and the first "
                                f"{frozen_stages} stages", "lower transfer.freeze_stages, or name layers: "
                                "transfer.lora_targets=['<regex>']")
        return chosen
    chosen = []
    for pattern in patterns:
        regex = re.compile(pattern)
        hits = [n for n in adaptable if regex.search(n)]
        if not hits:
            raise TransferError(f"transfer.lora_targets: '{pattern}' matches no Linear or ungrouped Conv2d layer",
                                f"use layer names as in audit.json, e.g. {adaptable[-1]}")
        chosen += hits
    return list(dict.fromkeys(chosen))


def add_adapters(backbone: nn.Module, targets: Sequence[str], rank: int, alpha: int, dropout: float) -> None:
    """LoRA layers in place of `targets` in `backbone`; each starts as the identity update (B = 0)."""
    from peft import LoraConfig, inject_adapter_in_model

    # Full names, so peft's suffix matching cannot pick up a second layer of the same local name.
    config = LoraConfig(r=int(rank), lora_alpha=int(alpha), lora_dropout=float(dropout),
                        target_modules=list(targets), bias="none")
    inject_adapter_in_model(config, backbone, adapter_name=ADAPTER)


def merge_adapters(backbone: nn.Module) -> int:
    """Fold every adapter into its layer's weight and put the plain layer back; returns how many were merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in backbone.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge(safe_merge=True)  # safe: a non-finite merged weight raises instead of passing silently
        parent, _, child = name.rpartition(".")
        setattr(backbone.get_submodule(parent) if parent else backbone, child, layer.get_base_layer())
    return len(layers)


__all__ = ["ADAPTER", "is_adapter_param", "adapter_targets", "add_adapters", "merge_adapters"]
