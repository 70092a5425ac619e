"""Every name a user can type for a choice, in one place per choice.

A choice that a config group makes (`data=csv` sets data.source, `scheduler=plateau` scheduler.name, ...) takes
the names of that group's YAML files: the file name is the name, and the schema field names the group
(`key(group="data")`). The builder registry in code behind each choice is keyed by the same names, and
tests/test_config.py holds every registry against this table. A choice that no config group makes lists its
names on its schema field (`key(choices=(...))`).

Only the standard library and the configs folder are read here, so a mistyped name fails before torch loads.
"""

from __future__ import annotations

from typing import Any

from transfer_cli.config.folders import config_groups
from transfer_cli.config.keys import declared
from transfer_cli.config.schema import TrainConfig
from transfer_cli.errors import TransferError, close_matches

# key -> the config group whose option names are its allowed values (schema fields declared with group=...)
GROUP_CHOICES = {dotted: spec.group for dotted, _, spec in declared(TrainConfig) if spec.group}
ALIASES = {"scheduler.name": ("none",)}  # older configs said scheduler.name=none for constant
# Config groups whose options combine (logger=[csv,mlflow]): each option switches on the boolean of its own name
# under the group (logger.mlflow), the options listed here switch them all off; the registry behind the booleans
# (tracking/trackers.py TRACKERS) is keyed by the other option names.
FLAG_GROUPS = {"logger": ("none",)}

# key -> allowed values, for the choices no config group makes (schema fields declared with choices=...)
ENUMS = {dotted: spec.choices for dotted, _, spec in declared(TrainConfig) if spec.choices}


def choices() -> dict[str, list[str]]:
    """Every choice key and its allowed values."""
    groups = config_groups()
    out = {key: groups[group] + list(ALIASES.get(key, ())) for key, group in GROUP_CHOICES.items()}
    out.update({group: groups[group] for group in FLAG_GROUPS})
    out.update({key: list(values) for key, values in ENUMS.items()})
    return out


def check_choices(cfg: Any) -> None:
    """Fields whose value must be one of a few names, after composition (OmegaConf has no Literal type)."""
    from omegaconf import OmegaConf

    for key, allowed in choices().items():
        if key in FLAG_GROUPS:  # booleans, typed by the schema
            continue
        value = OmegaConf.select(cfg, key)
        if value is not None and str(value) not in allowed and str(value).lower() in allowed:
            # `key=false` reaches a string field as "False" (Hydra parses it as a bool first): same choice.
            OmegaConf.update(cfg, key, str(value).lower())
            continue
        if value is not None and str(value) not in allowed:
            matches = close_matches(str(value), allowed)
            hint = f"did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""
            raise TransferError(
                f"{key}={value} is not a valid choice. {hint}".rstrip(), f"set {key} to one of: {', '.join(allowed)}"
            )


__all__ = ["choices", "check_choices", "GROUP_CHOICES", "ENUMS", "ALIASES", "FLAG_GROUPS"]
