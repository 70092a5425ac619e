"""What a resumed run checks against its checkpoint: the fingerprint of the data and model.

The fingerprint names what the checkpoint's weights mean: the backbone(s), the classes in their index order and
the task. A resume against data whose classes changed would silently map outputs to the wrong names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transfer_cli.errors import TransferError

FINGERPRINT_KEY = "fingerprint"


def fingerprint(meta: dict[str, Any]) -> dict[str, Any]:
    """From the run metadata (assembly/model.py's `run_meta`, or a checkpoint's `transfer` block)."""
    names = [str(n) for n in meta.get("class_names", [])]
    return {"backbone": meta.get("backbone"), "class_names": names, "num_classes": len(names),
            "task": meta.get("task", "multiclass")}


def check_fingerprint(saved_meta: dict[str, Any], current_meta: dict[str, Any], ckpt: Path, run_dir: Path) -> None:
    """Raise a TransferError naming every difference between the checkpoint's run and the run being resumed."""
    saved = saved_meta.get(FINGERPRINT_KEY) or fingerprint(saved_meta)
    now = fingerprint(current_meta)
    diffs = []
    for key in ("backbone", "task", "num_classes", "class_names"):
        if saved.get(key) != now.get(key):
            if key == "class_names":
                gone = [c for c in saved[key] if c not in now[key]]
                new = [c for c in now[key] if c not in saved[key]]
                detail = f"missing now: {gone}; new: {new}" if gone or new else "same classes, another order"
                diffs.append(f"class_names ({detail})")
            else:
                diffs.append(f"{key}: {saved.get(key)!r} in the checkpoint, {now.get(key)!r} now")
    if diffs:
        raise TransferError(
            f"cannot resume {ckpt}: the run does not match its checkpoint: " + "; ".join(diffs),
            "point the data back at what the run trained on, or start a new run from its weights: "
            f"transfer train <overrides> model.weights={ckpt}",
        )


__all__ = ["fingerprint", "check_fingerprint", "FINGERPRINT_KEY"]
