"""Which checkpoints an ensemble's `ckpt=` names: a list `ckpt=[runA,runB]`, or a folder holding `ensemble.json`.

`ensemble.json` = {"members": ["fold_0", "fold_1", ...], "weights": null}: member paths relative to that folder,
each a run dir or a .ckpt; `weights` optional (null: uniform), one positive number per member, normalized to sum
to 1. `transfer train`'s k-fold output writes this file. Plain JSON and paths only: a wrong ensemble fails before
torch loads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from transfer_cli.errors import TransferError
from transfer_cli.run_files import RunLayout

ENSEMBLE_FILE = "ensemble.json"


@dataclass(frozen=True)
class Members:
    refs: tuple[Path, ...]  # each a run dir or a .ckpt
    weights: tuple[float, ...]  # summing to 1
    folder: Optional[Path] = None  # the folder holding ensemble.json; None for a list

    @property
    def source(self) -> str:
        """What the ensemble was given as, for reports and messages."""
        if self.folder is not None:
            return str(self.folder / ENSEMBLE_FILE)
        return "[" + ", ".join(str(r) for r in self.refs) + "]"

    @property
    def uniform(self) -> bool:
        return len(set(self.weights)) == 1


def is_ensemble(ref: Any) -> bool:
    """Whether `ckpt=` names several checkpoints (a list, or a folder with ensemble.json)."""
    if isinstance(ref, (list, tuple)):
        return len(ref) > 1
    return (Path(str(ref)).expanduser() / ENSEMBLE_FILE).is_file()


def single(ref: Any) -> Any:
    """A one-element list as its element; anything else unchanged."""
    return ref[0] if isinstance(ref, (list, tuple)) and len(ref) == 1 else ref


def members_of(ref: Any) -> Optional[Members]:
    """The ensemble `ref` names, or None when it names one checkpoint (or an exported file)."""
    ref = single(ref)
    if isinstance(ref, (list, tuple)):
        return _checked(tuple(Path(str(r)).expanduser() for r in ref), None, None, "ckpt=[...]")
    folder = Path(str(ref)).expanduser()
    if not (folder / ENSEMBLE_FILE).is_file():
        return None
    spec = _read(folder / ENSEMBLE_FILE)
    refs = tuple(_member_path(folder, m) for m in spec["members"])
    return _checked(refs, spec.get("weights"), folder.resolve(), str(folder / ENSEMBLE_FILE))


def _read(path: Path) -> dict:
    fix = (f'write {path} as {{"members": ["fold_0", "fold_1"], "weights": null}} (member paths relative to its '
           "folder; weights optional, one positive number per member)")
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TransferError(f"{path} is not readable JSON ({e})", fix) from None
    members = spec.get("members") if isinstance(spec, dict) else None
    if not isinstance(members, list) or not members or not all(isinstance(m, str) and m for m in members):
        raise TransferError(f"{path} has no list of member paths under \"members\"", fix)
    return spec


def _member_path(folder: Path, member: str) -> Path:
    path = Path(member).expanduser()
    return path if path.is_absolute() else folder / path


def _checked(refs: tuple[Path, ...], weights: Any, folder: Optional[Path], where: str) -> Members:
    if len(refs) < 2:
        raise TransferError(f"{where} names {len(refs)} checkpoint; an ensemble needs two or more",
                            "name two or more run dirs or .ckpt files, or pass the one checkpoint as ckpt=<run dir>")
    for ref in refs:
        if not ref.exists():
            raise TransferError(f"{where}: member {ref} does not exist",
                                "each member is a run dir or a .ckpt of `transfer train`")
        if ref.suffix.lower() == ".onnx" or (ref.is_dir() and (ref / "model.onnx").is_file()
                                             and not RunLayout(ref).checkpoints.is_dir()):
            raise TransferError(f"{where}: member {ref} is an exported file; members are checkpoints",
                                "name the members' run dirs; `transfer export ckpt=[...]` exports the ensemble as one "
                                "file")
        if is_ensemble(str(ref)):
            raise TransferError(f"{where}: member {ref} is itself an ensemble ({ENSEMBLE_FILE})",
                                "list its members in this ensemble instead")
    # The same checkpoint twice is allowed: it weighs twice.
    return Members(refs, _weights(weights, len(refs), where), folder)


def _weights(weights: Any, n: int, where: str) -> tuple[float, ...]:
    if weights is None:
        return tuple([1.0 / n] * n)
    fix = f'"weights": null (uniform) or a list of {n} positive numbers, one per member'
    if not isinstance(weights, list) or len(weights) != n:
        raise TransferError(f"{where}: weights must list one number per member ({n})", fix)
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise TransferError(f"{where}: weights {weights} are not all numbers", fix) from None
    if not all(math.isfinite(w) and w > 0 for w in values):
        raise TransferError(f"{where}: weights {weights} are not all positive", fix)
    total = sum(values)
    return tuple(w / total for w in values)


__all__ = ["Members", "members_of", "is_ensemble", "single", "ENSEMBLE_FILE"]
