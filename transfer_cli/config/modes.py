"""The transfer modes, one record each: what trains, whether any backbone weight ever trains, what a mode needs.

`transfer=<name>` picks configs/transfer/<name>.yaml (which sets transfer.mode) and, on your own data without an
experiment, configs/recipe/<recipe>.yaml. The per-epoch rule of each mode lives beside the network it freezes
(training/freezing.py RULES, keyed by these names); tests/test_transfer_modes.py holds the YAMLs, the recipes and
the rules against this table. Standard library only: the config checks read it before torch loads.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

from transfer_cli.errors import TransferError


@dataclass(frozen=True)
class TransferMode:
    name: str
    trains: str  # in words, for the README and --help
    frozen_backbone: bool  # no backbone weight ever trains: its features can be cached and a probe solved on them
    adapters: bool = False  # new low-rank weights are added to the backbone (merged back on export)
    package: Optional[str] = None  # the package the mode needs, and the extra that installs it
    extra: Optional[str] = None

    @property
    def recipe(self) -> str:
        return self.name  # configs/recipe/<name>.yaml


MODES = {m.name: m for m in (
    TransferMode("feature_extract", "the head only, on a frozen backbone", frozen_backbone=True),
    TransferMode("fine_tune", "everything, the backbone at transfer.backbone_lr_scale", frozen_backbone=False),
    TransferMode("partial", "everything but the stem and the first transfer.freeze_stages stages",
                 frozen_backbone=False),
    TransferMode("gradual_unfreeze", "the head, then one more stage from the top at each milestone",
                 frozen_backbone=False),
    TransferMode("lora", "low-rank adapters beside the frozen backbone weights, and the head",
                 frozen_backbone=False, adapters=True, package="peft", extra="peft"),
)}


def transfer_mode(name: str) -> TransferMode:
    return MODES[name]


def require_mode_package(name: str) -> None:
    """A mode whose package is missing fails with the extra to install, before torch loads."""
    mode = MODES.get(name)
    if mode is None or mode.package is None:
        return
    if importlib.util.find_spec(mode.package) is None:
        raise TransferError(f"transfer={name} needs the {mode.package} package, which is not installed",
                            f"pip install 'transfer-cli[{mode.extra}]'")


__all__ = ["TransferMode", "MODES", "transfer_mode", "require_mode_package"]
