"""Writes that readers see whole or not at all: every file the tool writes goes through here.

A plain `open(path, "w")` followed by a kill -9, a full disk or a second process reading leaves a half-written
file under the real name. Here the bytes go to a temporary file in the same directory (so the rename cannot
cross file systems), are flushed and fsynced, and only then `os.replace()` swaps it in, which is atomic on POSIX
and Windows. The directory is fsynced too, so the rename itself survives a power cut.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".partial"  # never *.ckpt or *.pt: a leftover temp file is not mistaken for a real one


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file; mkstemp's own is 0600


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), _FILE_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # the disk filled up, or the process is being interrupted: drop the partial copy
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """`obj` as indented JSON with a final newline: the format of every report the tool leaves behind."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialize fully first: a failure here touches no file at all
    return atomic_write_bytes(path, buffer.getvalue())


def leftover_temp_files(folder: str | Path) -> list[Path]:
    """Temporary files of interrupted writes (safe to delete once no process writes to `folder`)."""
    return sorted(Path(folder).glob(f".*{TEMP_SUFFIX}"))


__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
           "leftover_temp_files", "TEMP_SUFFIX"]
