"""The on-disk store of frozen-backbone features, keyed by a fingerprint of everything that shapes them.

One entry holds one split (or one augmented view of the training split) through one backbone. Its key hashes
the network (model config, class, a digest of every weight and buffer), the preprocessing, the precision and
device, the library versions and the image files with their sizes, modification and change times. Change any
of these and the key changes, so a stale entry is never read; it just stays on disk until the cache dir is cleared.
Entries are written atomically (transfer_cli/atomic.py), and each carries its shape and a checksum, so an
interrupted write or a damaged file is reported and recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from transfer_cli.atomic import atomic_torch_save

log = logging.getLogger("transfer_cli")

FORMAT = 3  # bump when the entry layout or what goes into the key changes (2: views seeded by seeding.VIEW,
# 3: files keyed by their ctime too)


def cache_key(parts: Any) -> str:
    """sha256 of `parts` as canonical JSON (sorted keys): equal inputs give equal keys across processes."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _update_with_tensor(h: "hashlib._Hash", tensor: torch.Tensor) -> None:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    h.update(f"{tuple(tensor.shape)}{flat.dtype}".encode())
    h.update(flat.view(torch.uint8).numpy())


def weights_digest(module: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of every parameter and buffer: the weights as loaded,
    whether they came from the hub, a file, a named source or a seeded random init."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        _update_with_tensor(h, tensor)
    return h.hexdigest()


def files_digest(samples: Sequence[Tuple[str, Any]]) -> List[list]:
    """[path, label, size, mtime_ns, ctime_ns] per sample: touching, replacing or relabelling an image changes it.

    The file's bytes are not hashed: that would read the whole data set on every run, a cache hit included. The
    change time (ctime) stands in for them: every write, and every reset of the mtime (`touch -d`, `cp -p`,
    os.utime), sets it to the present, and no tool can set it back, so an image rewritten with the same size and
    an mtime put back is still seen as changed. A chmod or a restore from backup changes it too, which costs one
    recomputation, never a stale feature."""
    rows = []
    for path, label in samples:
        try:
            st = os.stat(path)
            size, mtime, ctime = st.st_size, st.st_mtime_ns, st.st_ctime_ns
        except OSError:  # vanished since the scan: the loader will report it; the key must still differ
            size, mtime, ctime = -1, -1, -1
        rows.append([str(path), label, size, mtime, ctime])
    return rows


@dataclass
class CachedSplit:
    features: torch.Tensor  # (rows, width) float32, in sample order, unreadable images left out
    labels: torch.Tensor  # (rows,) class indices, or (rows, C) multi-hot targets
    bad: List[Tuple[str, str]]  # (path, reason) of the split's images that could not be decoded


def _checksum(features: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    _update_with_tensor(h, features)
    _update_with_tensor(h, labels)
    return h.hexdigest()


def _problem(obj: Any, key: str, num_samples: int, width: int) -> Optional[str]:
    """Why a loaded entry cannot be used, or None."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("key") != key:
        return "not an entry of this cache format"
    features, labels, bad = obj.get("features"), obj.get("labels"), obj.get("bad")
    if not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor) or not isinstance(bad, list):
        return "missing its tensors"
    rows = num_samples - len(bad)
    if features.dtype != torch.float32 or tuple(features.shape) != (rows, width) or len(labels) != rows:
        return f"of shape {tuple(features.shape)} and {len(labels)} labels where ({rows}, {width}) were expected"
    if obj.get("checksum") != _checksum(features, labels):
        return "damaged (checksum mismatch)"
    return None


class FeatureStore:
    """Entries under `directory` (created on first write); `directory=None` keeps nothing between runs."""

    def __init__(self, directory: Optional[str | Path]):
        self.directory = Path(directory).expanduser() if directory else None

    def path(self, key: str) -> Optional[Path]:
        return None if self.directory is None else self.directory / f"{key}.pt"

    def load(self, key: str, num_samples: int, width: int) -> Optional[CachedSplit]:
        """The entry for `key` if it exists and is whole; a damaged one is reported and treated as missing."""
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            problem = _problem(obj, key, num_samples, width)
        except Exception as e:  # truncated zip, garbage bytes, unpickling refused: all mean "recompute"
            problem = f"unreadable ({type(e).__name__}: {e})"
        if problem is not None:
            log.warning("feature cache file %s is %s: recomputing it", path, problem)
            return None
        return CachedSplit(obj["features"], obj["labels"], [(str(p), str(r)) for p, r in obj["bad"]])

    def save(self, key: str, entry: CachedSplit) -> Optional[Path]:
        """Writes atomically (temp file + rename); an unwritable cache dir costs a warning, not the run."""
        path = self.path(key)
        if path is None:
            return None
        payload = {
            "format": FORMAT,
            "key": key,
            "features": entry.features.contiguous(),
            "labels": entry.labels.contiguous(),
            "bad": [[p, r] for p, r in entry.bad],
            "checksum": _checksum(entry.features, entry.labels),
        }
        try:
            atomic_torch_save(payload, path)  # readers see the old entry or the whole new one
        except OSError as e:
            log.warning("could not write the feature cache file %s (%s); this run keeps its features in memory",
                        path, e)
            return None
        return path


__all__ = ["FeatureStore", "CachedSplit", "cache_key", "weights_digest", "files_digest", "FORMAT"]
