"""The configs folder and the options of each config group: the YAML file names are the names users type."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transfer_cli.errors import TransferError


def config_dir() -> Path:
    """configs/ of a source checkout, or the copy shipped inside the wheel as transfer_cli/configs."""
    spec = importlib.util.find_spec("transfer_cli.configs")
    if spec is not None and spec.submodule_search_locations:
        found = Path(list(spec.submodule_search_locations)[0])
        if (found / "train.yaml").is_file():
            return found
    checkout = Path(__file__).resolve().parents[2] / "configs"
    if (checkout / "train.yaml").is_file():
        return checkout
    raise TransferError("the configs folder is missing from this installation", "reinstall: pip install transfer-cli")


def config_groups() -> dict[str, list[str]]:
    """Each config group and its options, read from the folder names and YAML files."""
    root = config_dir()
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(("_", ".")) and any(d.glob("*.yaml"))
    }


__all__ = ["config_dir", "config_groups"]
