"""Command-line overrides in Hydra's grammar: the one place that parses them.

`key=value`, `+key=value` (add), `++key=value` (add or set), `~key` / `~key=value` (delete), `group=option`,
sweeps `key=a,b`. The textual helpers (`override_key`, `take`, `later_wins`) need no Hydra import, so the CLI
reads `hydra.run.dir=` or `resume=` before anything heavy loads; `parse` is Hydra's own parser, its syntax errors
turned into an error with the fix.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

from transfer_cli.errors import TransferError

QUOTING_FIX = ("write them as key=value; quote a value with spaces or special characters for Hydra and the shell, "
               "e.g. 'data.root=\"/my data/images\"'")


def override_key(arg: str) -> str:
    """The config key (or group) an override names, without its +, ++ or ~ prefix; '' for a flag (-m, --cfg)."""
    if arg.startswith("-"):
        return ""
    return arg.split("=", 1)[0].lstrip("+~")


def override_value(arg: str) -> Optional[str]:
    """The text after the first `=`, or None (`~key` deletes without one)."""
    key, sep, value = arg.partition("=")
    return value if sep else None


def names(args: Iterable[str], key: str) -> bool:
    """Whether an override in `args` sets `key` (with a value)."""
    return any(override_key(a) == key and "=" in a for a in args)


def unquoted(value: str) -> str:
    """A value as Hydra reads it when the whole of it is quoted (`"/my data"` -> `/my data`): how paths with
    spaces are written for Hydra."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        inner = value[1:-1]
        return inner.replace("\\" + value[0], value[0])  # Hydra's escaped quote of the same kind
    return value


def take(args: Sequence[str], key: str) -> tuple[Optional[str], list[str]]:
    """(the value the last `key=` in `args` gives, unquoted, or None; the other arguments)."""
    found, rest = None, []
    for arg in args:
        if override_key(arg) == key and "=" in arg:
            value = override_value(arg)
            found = None if value is None else unquoted(value)
        else:
            rest.append(arg)
    return found, rest


def later_wins(args: Iterable[str]) -> list[str]:
    """The overrides with each key once, the last one kept, where the later would win in Hydra too."""
    by_key: dict[str, str] = {}
    for arg in args:
        key = override_key(arg) or arg
        by_key.pop(key, None)
        by_key[key] = arg
    return list(by_key.values())


def parse(args: Sequence[str], fix: str = QUOTING_FIX) -> list[Any]:
    """Hydra's parse of the overrides (hydra.core.override_parser Override objects); a syntax error is an error
    with `fix`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(list(args))
    except HydraException as e:
        spaced = [a for a in args if " " in (override_value(a) or "") and unquoted(override_value(a) or "") ==
                  override_value(a)]
        if spaced and fix == QUOTING_FIX:  # the usual cause: a path with a space, quoted for the shell only
            key, value = spaced[0].split("=", 1)
            fix = f"quote the value for Hydra too: '{key}=\"{value}\"' (the outer quotes are for the shell)"
        raise TransferError(f"could not parse the overrides: {str(e).splitlines()[0]}", fix) from None


def list_value(arg: str) -> Optional[list]:
    """The list that `key=[a,b,c]` gives in Hydra's grammar (quoting as for any override), or None when the value
    is not a list; a syntax error is an error with the fix."""
    value = override_value(arg)
    if value is None or not value.lstrip().startswith("["):
        return None
    parsed = parse([arg])[0].value()
    return parsed if isinstance(parsed, list) else None


__all__ = ["QUOTING_FIX", "later_wins", "list_value", "names", "override_key", "override_value", "parse", "take",
           "unquoted"]
