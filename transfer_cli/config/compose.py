"""Finding the configs, composing them, and turning config mistakes into did-you-mean errors.

Everything here imports only Hydra/OmegaConf, so a mistyped override fails in well under a second, before torch.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Iterable

from transfer_cli.config.folders import config_dir, config_groups
from transfer_cli.config.modes import MODES
from transfer_cli.config.overrides import override_key, parse
from transfer_cli.config.schema import TrainConfig, register_configs, structured_schema
from transfer_cli.errors import TransferError, close_matches

SKIPPED_GROUPS = {"hydra"}  # Hydra's own group: its keys are Hydra's business


def _suggest(word: str, candidates: Iterable[str]) -> str:
    matches = close_matches(word, candidates)
    return f"did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_key(key: str) -> None:
    """Walk a dotted key through the schema; stop at free-form nodes (Dict/Any)."""
    node: Any = TrainConfig
    walked: list[str] = []
    for part in key.split("."):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return  # a Dict[str, Any] or Any field: free-form below here
        fields = _field_types(node)
        if part not in fields:
            where = ".".join(walked) or "the top level"
            candidates = list(fields) + ([] if walked else list(config_groups()))
            matches = close_matches(part, candidates)
            fix = (
                f"did you mean {'.'.join(walked + [matches[0]])}?"
                if matches
                else f"the keys of {where} are: {', '.join(sorted(fields))}"
            )
            raise TransferError(f"unknown config key '{key}': '{part}' is not a key of {where}", fix)
        walked.append(part)
        node = fields[part]


def check_overrides(overrides: list[str]) -> None:
    """Validate command-line overrides against the schema and the config groups, with did-you-mean hints.

    Types are left to OmegaConf, whose messages already name the key and the expected type.
    """
    from hydra.core.override_parser.types import Glob, OverrideType

    parsed = parse([o for o in overrides if "=" in o and not o.startswith("-")])
    groups = config_groups()
    for ov in parsed:
        key = ov.key_or_group
        if key.split(".")[0].split("/")[0] in SKIPPED_GROUPS or ov.type == OverrideType.DEL:
            continue
        if key in groups:
            value = ov.value()
            if isinstance(value, Glob):  # glob(*): Hydra matches it against the group's options itself
                if not value.filter(groups[key]):
                    raise TransferError(f"{ov.input_line} matches no option of config group '{key}'",
                                        f"the options are: {', '.join(groups[key])}")
                continue
            values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [value]
            if len(values) == 1 and isinstance(values[0], list):  # several options of one group: logger=[csv,mlflow]
                values = values[0] or [None]
            for value in values:
                if value is None or str(value) == "null":
                    raise TransferError(f"'{key}=null' does not remove a config group", f"write ~{key} instead")
                if str(value) not in groups[key]:
                    hint = _suggest(str(value), groups[key])
                    raise TransferError(
                        f"'{value}' is not an option of config group '{key}'. {hint}".rstrip(),
                        f"choose one of: {', '.join(groups[key])}",
                    )
            continue
        _check_key(key)


# Keys that name a run's own data (data=csv, data.root=..., ...).
OWN_DATA_KEYS = {"data", "data.source", "data.root", "data.csv"}
DEFAULT_TRANSFER = "feature_extract"  # configs/train.yaml's transfer choice


def own_data_defaults(overrides: list[str]) -> list[str]:
    """`transfer train` runs the demo (experiment=demo) unless the run names its own data. Then, with no experiment
    named (nor a resume), the demo gives way to the recipe named, or else to the recipe of the run's transfer mode
    (configs/recipe/<transfer>.yaml), so that fine-tuning on your images does not inherit the demo's linear-probe
    settings."""
    keys = {override_key(o) for o in overrides} - {""}
    if keys & {"experiment", "resume"} or not keys & OWN_DATA_KEYS:
        return list(overrides)
    if "recipe" in keys:  # recipe=fine_tune, or recipe=none for the schema's defaults
        return ["~experiment", *overrides]
    mode = DEFAULT_TRANSFER
    try:
        parsed = parse([o for o in overrides if o.split("=", 1)[0] == "transfer"])
    except TransferError:
        return list(overrides)  # check_overrides reports it
    for ov in parsed:
        if ov.is_sweep_override():
            # Hydra's sweeps are products, so one recipe per mode cannot ride along (and an interpolated
            # recipe=${transfer} may not choose other groups, as the feature_extract recipe's augmentation).
            raise TransferError("a sweep over transfer= on your own data needs its recipe named",
                                "sweep one transfer mode per command (each gets its own recipe), or add "
                                "recipe=none to sweep them all on the schema's defaults")
        mode = str(ov.value())
    recipe = MODES[mode].recipe if mode in MODES else mode  # an unknown mode: check_overrides names the choices
    return ["~experiment", f"recipe={recipe}", *overrides]


def compose(overrides: list[str] | None = None, config_name: str = "train") -> Any:
    """The composed config, as `transfer train` would build it (for tests and the non-train commands)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = own_data_defaults(list(overrides or []))
    check_overrides(overrides)
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=False)
    except HydraException as e:
        raise TransferError(f"the config does not compose: {e}", "check the overrides against `transfer train --help`")
    from transfer_cli.config.choices import check_choices

    check_choices(cfg)
    return cfg


def as_schema(cfg: Any) -> TrainConfig:
    """The config as the schema's dataclasses: plain, typed Python values, every interpolation resolved, every
    default the schema's, every value in range (config/checks.py). A TrainConfig passes through; a DictConfig
    (composed, or restored from a checkpoint written by this or an earlier version) is merged onto the schema."""
    if isinstance(cfg, TrainConfig):
        return cfg
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(structured_schema(), cfg)
        try:
            merged.paths.output_dir  # noqa: B018 - Hydra's run dir, which only a Hydra run has
        except OmegaConfBaseException:
            merged.paths.output_dir = None
        typed = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise TransferError(f"the config does not fit the schema: {str(e).splitlines()[0]}",
                            "check the overrides against `transfer train --help`")
    assert isinstance(typed, TrainConfig)
    from transfer_cli.config.checks import check_values

    check_values(typed)
    return typed
