"""The one parser of `key=value` arguments for the commands other than `transfer train` (whose arguments are
Hydra's): each command's own options, and the config overrides it lets through.

Imports only the standard library and our config code, so a mistyped option fails before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from transfer_cli.config.overrides import list_value, override_key, take
from transfer_cli.errors import TransferError, close_matches


@dataclass(frozen=True)
class Option:
    parse: Callable[[str], Any]
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()
    required: bool = False
    example: str = "..."  # shown in the fix of a missing or malformed argument


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false"):
        raise ValueError(text)
    return value == "true"


def _checkpoints(text: str) -> str | tuple[str, ...]:
    """ckpt=: one run dir or .ckpt, or a Hydra list of them, `[runA,runB]` (an ensemble; commands/members.py)."""
    items = list_value(f"ckpt={text}")
    if items is None:
        return text
    if not items or any(isinstance(item, (list, dict)) for item in items):
        raise ValueError(text)
    return str(items[0]) if len(items) == 1 else tuple(str(item) for item in items)


POSITIVE_INT = _positive_int
BOOL = _bool  # true | false
COUNT = _count  # 0, 1, 2, ...
POSITIVE_FLOAT = _positive_float
CHECKPOINTS = _checkpoints  # a run dir | .ckpt | [a,b,...] | a folder with ensemble.json


ANY_OVERRIDE: Optional[Sequence[str]] = None  # override_prefixes for commands that compose a whole run config


def take_run_dir(overrides: list[str]) -> tuple[Optional[str], list[str]]:
    """(hydra.run.dir=X's X, the other overrides): commands that compose a run's config (lr-find,
    augment-preview) write where `transfer train` would, when told with Hydra's own key."""
    return take(overrides, "hydra.run.dir")


def expand_home(arg: str) -> str:
    """`key=~/x` as `key=/home/me/x`: a shell does not expand `~` after `=`, and Hydra's grammar rejects it.
    Each value of a sweep (`key=~/a,~/b`) likewise; `~key` (Hydra's delete) is left alone."""
    import os

    key, sep, value = arg.partition("=")
    if not sep or "~" not in value:
        return arg
    parts = [os.path.expanduser(p) if p == "~" or p.startswith("~/") else p for p in value.split(",")]
    return f"{key}={','.join(parts)}"


def _allowed(key: str, prefixes: Optional[Sequence[str]]) -> bool:
    if prefixes is None:
        return True
    return any(key == p.rstrip(".") or (p.endswith(".") and key.startswith(p)) for p in prefixes)


def parse_command_args(
    command: str, args: Sequence[str], options: dict[str, Option],
    override_prefixes: Optional[Sequence[str]] = (),
) -> tuple[dict[str, Any], list[str]]:
    """(the command's option values, the config overrides it allows).

    `override_prefixes`: "data." lets every data.* key through, "data" the group choice data=<option>;
    ANY_OVERRIDE lets every config override through (commands that compose a run's config, as train does).
    Anything else is an error with a did-you-mean over both, since a silently ignored argument would make a
    report describe something other than what the user asked for.
    """
    from transfer_cli.config.compose import check_overrides

    values = {name: opt.default for name, opt in options.items()}
    overrides: list[str] = []
    for arg in args:
        key, sep, text = arg.partition("=")
        if not sep and not (arg.startswith("~") and _allowed(arg[1:], override_prefixes)):  # ~key deletes (Hydra)
            raise TransferError(f"`transfer {command}` takes key=value arguments, not '{arg}'",
                                f"e.g. transfer {command} {_example(options)}")
        if key in options:
            opt = options[key]
            if opt.choices and text not in opt.choices:
                hint = close_matches(text, opt.choices, n=1)
                raise TransferError(f"{key}={text} is not one of {', '.join(opt.choices)}"
                                    + (f"; did you mean {hint[0]}?" if hint else ""),
                                    f"{key}={hint[0] if hint else opt.choices[0]}")
            try:
                values[key] = opt.parse(text)
            except (TypeError, ValueError):
                raise TransferError(f"{arg}: {key} takes {opt.help or 'another value'}",
                                    f"e.g. {key}={opt.default if opt.default is not None else opt.example}")
        elif _allowed(override_key(arg), override_prefixes):
            overrides.append(arg)
        else:
            assert override_prefixes is not None
            candidates = list(options) + [p.rstrip(".") for p in override_prefixes]
            close = close_matches(key, candidates, n=1)
            if not close and "." in key:  # a mistyped key under an allowed group: data.bach_size
                close = close_matches(key, [p for p in override_prefixes], n=1)
            allowed = ", ".join([*(f"{o}=" for o in options),
                                 *(p + "*" if p.endswith(".") else p + "=" for p in override_prefixes)])
            raise TransferError(
                f"unknown argument '{key}' for `transfer {command}`{'' if close else _why_not(options)}"
                + (f"; did you mean {close[0]}?" if close else ""),
                ("it writes where output=<folder> says; " if key.startswith("hydra.") and "output" in options
                 else "") + f"the arguments are: {allowed}",
            )
    missing = [name for name, opt in options.items() if opt.required and values[name] is None]
    if missing:
        raise TransferError(f"`transfer {command}` needs {' and '.join(f'{m}=' for m in missing)}",
                            f"e.g. transfer {command} {_example(options)}")
    check_overrides(overrides)  # schema keys and types, with did-you-mean, before anything heavy is imported
    return values, overrides


def _why_not(options: dict[str, Option]) -> str:
    """Why a config key is no argument of this command: a command on a checkpoint takes the run's config from it;
    any other takes only the keys that choose what it reads."""
    if "ckpt" in options:
        return " (the rest of the run's config comes from the checkpoint)"
    return " (it takes only its own options and the keys that choose what it reads)"


def _example(options: dict[str, Option]) -> str:
    return " ".join(f"{name}={opt.example}" for name, opt in options.items() if opt.required) or "key=value"


__all__ = ["Option", "parse_command_args", "expand_home", "take_run_dir", "POSITIVE_INT", "POSITIVE_FLOAT", "COUNT",
           "BOOL", "CHECKPOINTS", "ANY_OVERRIDE"]
