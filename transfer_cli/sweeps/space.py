"""The search space of `transfer tune`: ranges in Hydra's sweep grammar as Optuna distributions, and back.

tune.params and the sweep overrides of the command line (`'optimizer.lr=tag(log, interval(1e-4, 1e-2))'`) are read
with Hydra's own override parser, mapped as hydra-optuna-sweeper mapped them; a sampled value goes back into a
`key=value` override of the trial's run.
"""

from __future__ import annotations

import re
from typing import Any

from transfer_cli.config.overrides import override_value, parse
from transfer_cli.errors import TransferError

OPTUNA_EXTRA = "pip install 'transfer-cli[optuna]'  (Optuna >= 4)"


def optuna_module() -> Any:
    try:
        import optuna
    except ImportError:
        raise TransferError("transfer tune needs Optuna, which is not installed", OPTUNA_EXTRA) from None
    if int(optuna.__version__.split(".")[0]) < 4:
        raise TransferError(f"transfer tune needs Optuna >= 4, found {optuna.__version__}", OPTUNA_EXTRA)
    return optuna


def flat_params(params: Any, prefix: str = "") -> dict[str, str]:
    """tune.params as {config key: range}; a key given as +tune.params.a.b=... arrives nested."""
    out: dict[str, str] = {}
    for key, value in (params or {}).items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def distribution(key: str, text: str) -> Any:
    """One range in Hydra's sweep grammar as an Optuna distribution (the mapping hydra-optuna-sweeper used)."""
    optuna = optuna_module()
    dists = optuna.distributions
    try:
        (override,) = parse([f"{key}={text}"])
    except TransferError as e:
        raise TransferError(f"tune.params.{key}={text} is not a range: {e.message}",
                            "write interval(1e-4, 1e-2), tag(log, interval(...)), choice(a, b) or range(1, 5)") from None
    if override.is_choice_sweep() or (override.is_sweep_override() and not override.is_interval_sweep()
                                      and not override.is_range_sweep()):
        return dists.CategoricalDistribution(list(override.sweep_iterator()))
    value = override.value()
    log_scale = "log" in getattr(value, "tags", set())
    if override.is_interval_sweep():
        if isinstance(value.start, int) and isinstance(value.end, int):  # int(interval(1, 8)): Hydra's cast
            return dists.IntDistribution(int(value.start), int(value.end), log=log_scale)
        return dists.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if override.is_range_sweep():  # range(start, stop, step): stop excluded, as in Python
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in values):
            return dists.IntDistribution(values[0], values[-1], step=int(value.step), log=log_scale)
        return dists.FloatDistribution(values[0], values[-1], step=float(value.step))
    raise TransferError(f"tune.params.{key}={text} is a single value, not a range",
                        f"e.g. {key}=choice({text}, ...) or set it as a plain override: {key}={text}")


def as_override(key: str, value: Any) -> str:
    if isinstance(value, str) and not re.fullmatch(r"[\w\-./:]+", value):
        value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{key}={value}"


def split_sweeps(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """(plain overrides, sweep overrides as search dimensions {key: range})."""
    plain, sweeps = [], {}
    for text, override in zip(overrides, parse(overrides)):
        if override.is_sweep_override():
            sweeps[override.key_or_group] = override_value(text) or ""
        else:
            plain.append(text)
    return plain, sweeps


__all__ = ["distribution", "as_override", "flat_params", "split_sweeps", "optuna_module", "OPTUNA_EXTRA"]
