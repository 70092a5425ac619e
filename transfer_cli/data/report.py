"""What a data set holds before anything trains on it: images per class and split, class imbalance, image sizes
and modes, unreadable files, and byte-identical files shared by two splits (a test image that is also a training
image inflates the test score).

Plain arguments only (paths, class names, counts), no torch: `transfer data-report` runs in a second, and the
short form at the start of every run costs little. Duplicates are found as file-deduplication tools find them:
files are grouped by size first (one stat each), and only sizes that occur in two splits are hashed (sha256 of the
file bytes), so a data set without duplicates is barely read.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

from transfer_cli.data.splits import SPLITS, DataSplits

HASH_CHUNK = 1 << 20
TOP_SIZES = 10  # the most common image sizes listed in the report


@dataclass(frozen=True)
class DuplicateGroup:
    """Files with identical bytes that lie in more than one split: (split, path) pairs, sorted."""

    sha256: str
    files: tuple[tuple[str, str], ...]

    @property
    def splits(self) -> list[str]:
        return sorted({split for split, _ in self.files})

    def as_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "splits": self.splits,
                "files": [{"split": split, "path": path} for split, path in self.files]}


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def duplicate_groups(files_by_split: Mapping[str, Iterable[str]]) -> list[DuplicateGroup]:
    """Groups of byte-identical files found in at least two of the splits, e.g.
    `duplicate_groups({"train": train_paths, "test": test_paths})`. A file that cannot be read is left out (the
    report lists it as unreadable). Sorted by the first file of each group."""
    by_size: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for split, paths in files_by_split.items():
        for path in dict.fromkeys(str(p) for p in paths):  # a path listed twice in one split is one file
            try:
                by_size[os.stat(path).st_size].append((split, path))
            except OSError:
                continue
    by_digest: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for same_size in by_size.values():
        if len({split for split, _ in same_size}) < 2:
            continue  # no other split holds a file of this size: no duplicate across splits
        for split, path in same_size:
            try:
                by_digest[file_sha256(path)].append((split, path))
            except OSError:
                continue
    groups = [DuplicateGroup(digest, tuple(sorted(files))) for digest, files in by_digest.items()
              if len({split for split, _ in files}) >= 2]
    return sorted(groups, key=lambda g: g.files[0])


def imbalance_ratio(counts: Sequence[int]) -> Optional[float]:
    """The largest class's count over the smallest's; None when a class has no image (the ratio is unbounded)."""
    if not counts or min(counts) <= 0:
        return None
    return max(counts) / min(counts)


@dataclass
class HeaderStats:
    """What image headers say (no pixel is decoded): sizes, modes and formats, and the files PIL cannot open."""

    sizes: Counter = field(default_factory=Counter)  # "WxH" -> images
    modes: Counter = field(default_factory=Counter)  # PIL mode (RGB, L, RGBA, P, CMYK, I;16, ...) -> images
    formats: Counter = field(default_factory=Counter)  # PNG, JPEG, ...
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def as_dict(self) -> dict[str, Any]:
        def spread(values: list[int]) -> Optional[dict[str, int]]:
            ordered = sorted(values)
            return {"min": ordered[0], "median": ordered[len(ordered) // 2], "max": ordered[-1]} if ordered else None

        return {"sizes": dict(self.sizes.most_common(TOP_SIZES)), "distinct_sizes": len(self.sizes),
                "width": spread(self.widths), "height": spread(self.heights), "modes": dict(self.modes.most_common()),
                "formats": dict(self.formats.most_common()),
                "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable]}


def read_headers(paths: Iterable[str]) -> HeaderStats:
    from PIL import Image, UnidentifiedImageError

    stats = HeaderStats()
    for path in paths:
        try:
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
                stats.modes[image.mode] += 1
                stats.formats[str(image.format)] += 1
        except (OSError, UnidentifiedImageError, ValueError) as e:
            stats.unreadable.append((str(path), f"{type(e).__name__}: {e}".replace("\n", " ")))
            continue
        stats.sizes[f"{width}x{height}"] += 1
        stats.widths.append(width)
        stats.heights.append(height)
    return stats


def split_paths(splits: DataSplits) -> dict[str, list[str]]:
    return {name: [path for path, _ in getattr(splits, name)] for name in SPLITS if getattr(splits, name)}


def data_report(splits: DataSplits, headers: bool = True) -> dict[str, Any]:
    """The report as plain JSON data. `headers=False` is the short form a training run starts with: counts,
    imbalance and duplicates across splits, without opening every image."""
    names = list(splits.class_names)
    per_split = {name: dict(zip(names, splits.counts(name))) for name in SPLITS if getattr(splits, name)}
    train_counts = splits.counts("train")
    ratio = imbalance_ratio(train_counts)
    paths = split_paths(splits)
    duplicates = duplicate_groups(paths)
    report: dict[str, Any] = {
        "data": splits.source_desc,
        "task": "multilabel" if splits.multilabel else "multiclass",
        "class_names": names,
        "images": {name: len(p) for name, p in paths.items()},
        "per_class": per_split,
        # train counts; with label sets, images holding each label
        "imbalance_ratio": None if ratio is None else round(ratio, 3),
        "largest_class": names[train_counts.index(max(train_counts))],
        "smallest_class": names[train_counts.index(min(train_counts))],
        "classes_without_train_images": [n for n, c in zip(names, train_counts) if c == 0],
        "duplicates_across_splits": [g.as_dict() for g in duplicates],
        "duplicate_files_across_splits": sum(len(g.files) for g in duplicates),
    }
    if headers:
        report["headers"] = read_headers(p for group in paths.values() for p in group).as_dict()
    return report


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report in a few lines, for the log and the terminal."""
    images = ", ".join(f"{split} {n}" for split, n in report["images"].items())
    lines = [f"data: {len(report['class_names'])} classes; images: {images}"]
    ratio = report["imbalance_ratio"]
    lines.append("class imbalance (train): largest/smallest = "
                 + (f"{ratio:g} ({report['largest_class']} / {report['smallest_class']})" if ratio is not None else
                    f"unbounded: no training image of {', '.join(report['classes_without_train_images'])}"))
    headers = report.get("headers")
    if headers:
        sizes = ", ".join(f"{size} ({n})" for size, n in list(headers["sizes"].items())[:3])
        lines.append(f"image sizes: {headers['distinct_sizes']} distinct, most common {sizes}; modes: "
                     + ", ".join(f"{m} ({n})" for m, n in headers["modes"].items()))
        if headers["unreadable"]:
            lines.append(f"unreadable: {len(headers['unreadable'])} file(s), e.g. {headers['unreadable'][0]['path']}")
    groups = report["duplicates_across_splits"]
    if groups:
        first = groups[0]["files"]
        lines.append(f"byte-identical across splits: {len(groups)} group(s) of {report['duplicate_files_across_splits']}"
                     f" files, e.g. {first[0]['path']} ({first[0]['split']}) = {first[1]['path']} ({first[1]['split']})")
    return lines


__all__ = ["duplicate_groups", "DuplicateGroup", "file_sha256", "imbalance_ratio", "read_headers", "HeaderStats",
           "data_report", "report_lines", "split_paths"]
