"""The `imagefolder` data source: root/<class>/*.jpg, or root/{train,val[,test]}/<class>/*.jpg.

Only paths and class indices are collected here; images are opened later by the data loaders, so discovery of
a large dataset stays cheap and a broken image never stops it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List

from transfer_cli.data.splits import SPLIT_ALIASES, DataSplits, split_fractions, split_samples
from transfer_cli.errors import TransferError

# torchvision's IMG_EXTENSIONS (copied so discovery does not import torchvision), and GIF, which PIL reads too
# (its first frame).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
log = logging.getLogger("transfer_cli")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_images(folder: Path) -> List[str]:
    """Every image file under `folder`, recursively, sorted; hidden files and folders skipped.

    Links are followed within `folder` only, and no file is listed twice: a link back up the tree (a cycle) or
    to a folder elsewhere (another class's images, say) is skipped and reported, as is a second path to a file.
    """
    top = os.path.realpath(folder)
    seen_dirs, seen_files, skipped = {top}, set(), []
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(d for d in dirnames if not _is_hidden(d)):
            path = os.path.join(dirpath, d)
            real = os.path.realpath(path)
            if real in seen_dirs:
                skipped.append(f"{path} -> {real} (already listed: a link loop or a second link)")
            elif real != top and not real.startswith(top + os.sep):
                skipped.append(f"{path} -> {real} (outside {folder})")
            else:
                seen_dirs.add(real)
                keep.append(d)
        dirnames[:] = keep  # in place: os.walk then descends only into these
        for name in sorted(filenames):
            if _is_hidden(name) or not name.lower().endswith(IMG_EXTENSIONS):
                continue
            path = os.path.join(dirpath, name)
            real = os.path.realpath(path)
            if real in seen_files:
                skipped.append(f"{path} (the same file as another path already listed)")
                continue
            seen_files.add(real)
            found.append(path)
    if skipped:
        log.warning("%d linked path(s) under %s not followed:\n    %s", len(skipped), folder, "\n    ".join(skipped))
    return found


def _class_folders(folder: Path) -> Dict[str, List[str]]:
    classes = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name)):
        images = list_images(d)
        if not images:
            raise TransferError(
                f"class folder {d} holds no images ({', '.join(IMG_EXTENSIONS)})",
                f"add images to it or remove the folder {d.name}/",
            )
        classes[d.name] = images
    return classes


def _one_label_per_file(per_split: Dict[str, Dict[str, List[str]]]) -> None:
    """A file reached from two class folders (or two splits) through links would train as two things at once."""
    owners: Dict[str, str] = {}
    clashes = []
    for split, folders in per_split.items():
        for name, paths in folders.items():
            for path in paths:
                place = f"{split}/{name}" if split else name
                real = os.path.realpath(path)
                if real in owners and owners[real] != place:
                    clashes.append(f"{real} in {owners[real]} and in {place}")
                owners.setdefault(real, place)
    if clashes:
        shown = "\n    ".join(clashes[:10]) + (f"\n    ... and {len(clashes) - 10} more" if len(clashes) > 10 else "")
        raise TransferError(f"{len(clashes)} image file(s) sit in two class folders or splits (through links):\n"
                            f"    {shown}", "keep each image in one class folder of one split; remove the links")


def from_imagefolder(root_dir: str | None, val_fraction: float, test_fraction: float, split_seed: int) -> DataSplits:
    """The class folders under `root_dir`; val (and test) drawn from train/ when the folder has no such split."""
    if not root_dir:
        raise TransferError("data.root is not set", "point it at your images: data.root=/path/to/images")
    root = Path(os.path.expanduser(str(root_dir))).resolve()
    if not root.is_dir():
        raise TransferError(f"data.root {root} is not a folder", "check the path: data.root=/path/to/images")
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    split_dirs = {SPLIT_ALIASES[k]: v for k, v in sorted(subdirs.items()) if k in SPLIT_ALIASES}

    if "train" in split_dirs:
        layout = "train/" + "".join(f", {s}/" for s in ("val", "test") if s in split_dirs)
        per_split = {s: _class_folders(d) for s, d in split_dirs.items()}
        _one_label_per_file(per_split)
        class_names = sorted(per_split["train"])
        for s, folders in per_split.items():
            extra = sorted(set(folders) - set(class_names))
            if extra:
                raise TransferError(
                    f"{split_dirs[s]} has class folders missing from train/: {', '.join(extra)}",
                    f"add them to {split_dirs['train']} or remove them from {split_dirs[s]}",
                )
        c2i = {c: i for i, c in enumerate(class_names)}
        samples = {s: [(p, c2i[c]) for c, paths in f.items() for p in paths] for s, f in per_split.items()}
        train, val, test = samples["train"], samples.get("val"), samples.get("test", [])
        if val is None:  # no val/: carve it (and test, when there is no test/ either) out of train/
            layout += f" (val{' and test' if 'test' not in samples else ''} drawn from train/)"
            fr = split_fractions(val_fraction, test_fraction, with_test="test" not in samples)
            train, val, drawn_test = split_samples(train, fr, int(split_seed))
            test = test or drawn_test
    else:
        folders = _class_folders(root)
        _one_label_per_file({"": folders})
        if not folders:
            raise TransferError(
                f"no class subfolders under {root}",
                "arrange images as data.root/<class>/*.jpg or data.root/{train,val}/<class>/*.jpg",
            )
        class_names = sorted(folders)
        samples_all = [(p, i) for i, c in enumerate(class_names) for p in folders[c]]
        fr = split_fractions(val_fraction, test_fraction, with_test=True)
        train, val, test = split_samples(samples_all, fr, int(split_seed))
        layout = f"<class>/ split by split_seed={split_seed}"
    return DataSplits(class_names, train, val, test, f"imagefolder {root} ({layout})")


__all__ = ["from_imagefolder", "list_images", "IMG_EXTENSIONS"]
