"""Checkpoint writes that never leave a half-written file under a checkpoint's name.

Lightning's TorchCheckpointIO serializes to memory and then writes the target file in place: a kill -9 or a full
disk during that write leaves a truncated last.ckpt where the previous good one was. Here the bytes go to a
temporary file in the same directory (so the rename cannot cross file systems), are flushed and fsynced, and
only then os.replace() swaps it in, which is atomic on POSIX and Windows. The directory is fsynced too, so the
rename itself survives a power cut.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

TEMP_SUFFIX = ".partial"  # never *.ckpt: a leftover temp file is not mistaken for a checkpoint


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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
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


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialize fully first: a failure here touches no file at all
    atomic_write_bytes(path, buffer.getvalue())


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are atomic (see the module docstring); loading is unchanged."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        if "://" in str(path):  # a remote file system (s3://, gs://): its own semantics, Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def leftover_temp_files(folder: str | Path) -> list[Path]:
    """Temporary files of interrupted writes (safe to delete once no run writes to `folder`)."""
    return sorted(Path(folder).glob(f".*{TEMP_SUFFIX}"))


__all__ = ["AtomicCheckpointIO", "atomic_write_bytes", "atomic_torch_save", "leftover_temp_files", "TEMP_SUFFIX"]
