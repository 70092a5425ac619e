"""A run's config resolved once, at the entry: the immutable TrainConfig everything downstream reads.

`as_schema` (config/compose.py) turns a composed config into the schema's frozen dataclasses and checks every
value; `resolve_run` then makes concrete what depends on this machine and this run, so no later layer
re-interprets it: trainer.precision in Lightning's canonical name with `auto` decided, the run dir and the data
paths absolute. A variant of a resolved config is `replace_at(cfg, {"trainer.max_epochs": 1})`, never a mutation.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, TypeVar

from transfer_cli.config.schema import TrainConfig

log = logging.getLogger("transfer_cli")

T = TypeVar("T")


def replace_at(cfg: T, values: Mapping[str, Any]) -> T:
    """A copy of the (frozen, nested) dataclass `cfg` with each dotted key set: {"trainer.precision": "32-true"}."""
    nested: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, inner in nested.items():
        top[head] = replace_at(getattr(cfg, head), inner)
    return dataclasses.replace(cfg, **top)  # type: ignore[type-var]


def eval_batch_size(data: Any) -> int:
    """data.eval_batch_size, or twice data.batch_size: no gradients are kept when evaluating, so twice the training
    batch fits where the batch does. resolve_run writes it into the run's config; a TrainConfig built by hand (the
    library tests) gets the same rule here."""
    return int(data.eval_batch_size or 2 * data.batch_size)


def _absolute(path: Optional[str]) -> Optional[str]:
    """`path` from the folder the command ran in, `~` expanded; symlinks kept as the user named them."""
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def resolve_run(cfg: Any, run_dir: Optional[Path] = None) -> TrainConfig:
    """The config `cfg` (composed, restored, or a TrainConfig) as this run runs it. `run_dir`: where it runs
    (default: paths.output_dir). Resolving a resolved config changes nothing."""
    from transfer_cli.config.compose import as_schema
    from transfer_cli.precision import resolve_auto

    typed = as_schema(cfg)
    precision, why = resolve_auto(typed.trainer.precision, typed.trainer.accelerator)
    if why:
        log.info(why)
    output_dir = run_dir if run_dir is not None else typed.paths.output_dir
    return replace_at(typed, {
        "trainer.precision": precision,
        "paths.output_dir": str(Path(output_dir).expanduser().resolve()) if output_dir else None,
        "data.root": _absolute(typed.data.root),
        "data.csv": _absolute(typed.data.csv),
        "transfer.cache_dir": _absolute(typed.transfer.cache_dir),
        "data.eval_batch_size": eval_batch_size(typed.data),
    })


__all__ = ["eval_batch_size", "replace_at", "resolve_run"]
