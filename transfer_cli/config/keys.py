"""What one config key declares beside its type and default: its range, its choices, whether a resumed run may
change it, its role and its help. Each is stated once, on the schema field (config/schema.py, `key(...)`), and
everything that used to keep a list of key names reads it from there: the range walk of config/checks.py, the
allowed names of config/choices.py, the keys a resume may change (resume/plan.py), the preprocessing a restored
checkpoint keeps (commands/restore.py) and the key reference of `transfer train --help`.

Standard library only: it runs before torch, on every command line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

_NO_DEFAULT: Any = dataclasses.MISSING


@dataclass(frozen=True)
class Range:
    """An interval as written in the schema: "[0, 1)", "(0, inf)", "[1, inf)"."""

    low: Optional[float]
    high: Optional[float]
    low_open: bool
    high_open: bool

    @classmethod
    def parse(cls, text: str) -> "Range":
        text = text.strip()
        lo, hi = (None if part.strip() in ("inf", "-inf") else float(part) for part in text[1:-1].split(","))
        return cls(lo, hi, text[0] == "(", text[-1] == ")")

    def holds(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


@dataclass(frozen=True)
class Spec:
    help: str = ""
    within: Optional[Range] = None  # a number's range (a list's: each element's); None: any value of the type
    example: Any = None  # the value an error suggests; None: the default where it is in range, else the low end
    choices: tuple = ()  # the names a string key allows, where no config group makes the choice
    group: Optional[str] = None  # the config group whose option names are the allowed values (data=csv, ...)
    resume: bool = False  # a resumed run may change it (its length, logging, how data is loaded, ...)
    role: str = ""  # "preprocessing": restored from the checkpoint's data config unless overridden
    # The range applies only where this holds of the whole config (a momentum only for an optimizer that takes one)
    when: Optional[Callable[[Any], bool]] = None


def key(default: Any = _NO_DEFAULT, *, factory: Optional[Callable[[], Any]] = None, within: Optional[str] = None,
        **spec: Any) -> Any:
    """A schema field with its declaration: `lr: float = key(1e-3, within="(0, inf)", help="...")`."""
    meta = {"spec": Spec(within=Range.parse(within) if within else None, **spec)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def spec_of(field: dataclasses.Field) -> Spec:
    return field.metadata.get("spec", Spec())


def declared(schema: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Spec]]:
    """(dotted key, field, spec) of every leaf key of a schema dataclass, nested groups walked."""
    for f in dataclasses.fields(schema):
        dotted = f"{prefix}{f.name}"
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if isinstance(nested, type) and dataclasses.is_dataclass(nested):
            yield from declared(nested, dotted + ".")
        else:
            yield dotted, f, spec_of(f)


def default_of(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def example_of(field: dataclasses.Field, spec: Spec) -> Any:
    if spec.example is not None:
        return spec.example
    default = default_of(field)
    if spec.within is not None and not (isinstance(default, (int, float)) and spec.within.holds(default)):
        low = spec.within.low
        return int(low) if low is not None and float(low).is_integer() else low
    return default





def _allowed(spec: Spec, groups: dict[str, list[str]]) -> str:
    if spec.group:
        return " | ".join(groups.get(spec.group, [])) + f" ({spec.group}=<name>)"
    if spec.choices:
        return " | ".join(spec.choices)
    return str(spec.within) if spec.within else ""


def key_reference(schema: type, groups: dict[str, list[str]]) -> str:
    """Every key, its type, default, allowed values, whether a resume may change it, and its help: the `== Keys ==`
    section of `transfer train --help`, from the same declarations the checks read."""
    lines = []
    for dotted, field, spec in declared(schema):
        default = default_of(field)
        shown = "null" if default is None else str(default)
        parts = [f"  {dotted}: {field.type} = {shown}", _allowed(spec, groups),
                 "(may change on resume)" if spec.resume else "", spec.help]
        lines.append("  ".join(p for p in parts if p))
    return "\n".join(lines)
__all__ = ["Range", "Spec", "key", "spec_of", "declared", "default_of", "example_of", "key_reference"]
