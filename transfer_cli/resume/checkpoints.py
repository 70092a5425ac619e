"""Finding and reading a run's checkpoints: what `resume=`, `ckpt=` (eval, predict, export) point at.

A reference is a .ckpt file or a run dir; a run dir means its checkpoints/best.ckpt or last.ckpt, and when that
one is missing or cut short (killed mid-write before writes were atomic, a full disk, a copy in progress) the
newest checkpoint that is still whole.
"""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path
from typing import Any

from transfer_cli.errors import TransferError
from transfer_cli.run_files import CHECKPOINT_DIR

CHECKPOINT_KEY = "transfer"  # our block inside every checkpoint (TransferModule.on_save_checkpoint)
log = logging.getLogger("transfer_cli")

# The last checkpoint read, by (path, size, mtime): a command reads its checkpoint once, however many parts of it
# look at the checkpoint (the resume plan, the fingerprint check, the metrics log, Lightning's own restore).
_LAST_READ: dict[tuple, dict[str, Any]] = {}


def is_whole(path: Path) -> bool:
    """Cheap completeness check: torch.save writes a zip archive whose directory is at the very end, so a
    truncated file fails to open, and a corrupted member fails its CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def checkpoints_in(run_dir: Path) -> list[Path]:
    """Every *.ckpt of a run dir (its checkpoints/ folder, or the folder itself), newest first."""
    folder = run_dir / CHECKPOINT_DIR if (run_dir / CHECKPOINT_DIR).is_dir() else run_dir
    found = [p for p in folder.glob("*.ckpt") if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def run_dir_of(ckpt_path: Path) -> Path:
    """The run dir a checkpoint belongs to: <run dir>/checkpoints/x.ckpt -> <run dir>."""
    parent = ckpt_path.resolve().parent
    return parent.parent if parent.name == CHECKPOINT_DIR else parent


def resolve_checkpoint(ref: str | Path, prefer: str = "best") -> Path:
    """A .ckpt file -> itself; a run dir -> checkpoints/<prefer>.ckpt, or else the newest whole checkpoint."""
    if prefer not in ("best", "last"):
        raise ValueError(f"prefer must be 'best' or 'last', got {prefer!r}")
    path = Path(ref).expanduser()
    if path.is_file():
        return path.resolve()
    if not path.exists():
        raise TransferError(f"no checkpoint or run dir at {path}",
                            "pass a run dir (outputs/<name>/<date>_<time>) or its checkpoints/best.ckpt")
    candidates = checkpoints_in(path)
    preferred = next((p for p in candidates if p.name == f"{prefer}.ckpt"), None)
    if preferred is not None and is_whole(preferred):
        return preferred.resolve()
    if preferred is not None:
        log.warning("%s is unreadable (cut short?); looking for another checkpoint in %s", preferred, path)
    for other in candidates:
        if other != preferred and is_whole(other):
            if preferred is not None or prefer == "last":
                log.warning("using %s instead of %s.ckpt", other, prefer)
            return other.resolve()
    what = "only unreadable checkpoints" if candidates else "no checkpoint"
    raise TransferError(f"{path} holds {what} (looked for {CHECKPOINT_DIR}/*.ckpt)",
                        f"pass a run dir whose training saved a checkpoint, e.g. ls {path.parent}")


def _identity(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint as plain data (weights_only=True: no code runs while loading), on the CPU; read from disk
    once per command (see _LAST_READ). Callers must not modify it."""
    import torch

    path = Path(path)
    identity = _identity(path)
    if identity is not None and identity in _LAST_READ:
        return _LAST_READ[identity]
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TransferError(f"no checkpoint at {path}", "pass an existing .ckpt file or a run dir")
    except Exception as e:  # truncated zip, not a torch file, or pickled objects weights_only refuses
        raise _unreadable(path, e) from None
    if not isinstance(ckpt, dict):
        raise TransferError(f"{path} is not a Lightning checkpoint", "pass a .ckpt written by `transfer train`")
    _LAST_READ.clear()
    if identity is not None:
        _LAST_READ[identity] = ckpt
    return ckpt


def _unreadable(path: Path, err: Exception) -> TransferError:
    """Why a checkpoint could not be read (naming any code it carries), and a checkpoint that can be."""
    import pickle

    import torch

    if isinstance(err, pickle.UnpicklingError):
        try:
            carried = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - not even a zip: fall through to the general message
            carried = []
        if carried:
            why = (f"it holds pickled Python objects beyond tensors ({', '.join(carried)}), which are not loaded "
                   "since they could run code; checkpoints of `transfer train` hold plain data only")
            return TransferError(f"cannot read checkpoint {path}: {why}", _other_checkpoint(path) or
                                 "if you trust the file, re-save it as plain data: "
                                 "torch.save(torch.load(p, weights_only=False)['state_dict'], 'weights.pth') and "
                                 "start a new run from it with model.weights=weights.pth")
    detail = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    why = f"{type(err).__name__}: {detail[0][:300] if detail else ''}"
    return TransferError(f"cannot read checkpoint {path} ({why}): it is cut short or not a checkpoint",
                         _other_checkpoint(path) or "pass a checkpoint written by `transfer train`")


def _other_checkpoint(path: Path) -> str | None:
    """A fix naming another whole checkpoint of the same run, when there is one."""
    others = [p for p in checkpoints_in(run_dir_of(path)) if p.resolve() != path.resolve() and is_whole(p)]
    return f"pass another checkpoint of the run: {others[0]}" if others else None


def forget_checkpoint() -> None:
    """Drop the remembered checkpoint (its tensors are large) once nothing else in this command reads it."""
    _LAST_READ.clear()


def checkpoint_step(path: str | Path | None) -> int | None:
    """The checkpoint's optimizer step (for pruning metrics.csv and TensorBoard's purge_step); None: no resume."""
    if not path:
        return None
    return int(read_checkpoint(path).get("global_step", 0))


def checkpoint_meta(ckpt: dict[str, Any], path: str | Path = "the checkpoint") -> dict[str, Any]:
    """Our block: config, class_names, class_to_idx, data_config, backbone, task, ... (and fingerprint)."""
    meta = ckpt.get(CHECKPOINT_KEY)
    if not isinstance(meta, dict) or "config" not in meta:
        raise TransferError(f"{path} has no '{CHECKPOINT_KEY}' block: it was not written by `transfer train`",
                            "pass a checkpoint from a run dir of `transfer train`")
    return meta


def checkpoint_config(ckpt: dict[str, Any]) -> Any:
    """The run's composed, resolved config (a DictConfig) stored in the checkpoint."""
    from omegaconf import OmegaConf

    return OmegaConf.create(checkpoint_meta(ckpt)["config"])


__all__ = ["resolve_checkpoint", "read_checkpoint", "forget_checkpoint", "checkpoint_step", "checkpoint_config",
           "checkpoint_meta", "checkpoints_in", "run_dir_of", "is_whole", "CHECKPOINT_DIR", "CHECKPOINT_KEY"]
