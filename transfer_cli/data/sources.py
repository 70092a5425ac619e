"""Find the labelled samples of a run: an image folder here; a CSV manifest (manifest.py) or ELPV (elpv.py).

Only paths and class indices are collected here; images are opened later by the data loaders, so discovery of
a large dataset stays cheap and a broken image never stops it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np

from transfer_cli.errors import TransferError

# (image path, class index); with task=multilabel (image path, tuple of the indices of its labels, maybe empty)
Sample = Tuple[str, Union[int, Tuple[int, ...]]]

# torchvision's IMG_EXTENSIONS, copied so discovery does not import torchvision.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class DataSplits:
    class_names: List[str]
    train: List[Sample]
    val: List[Sample]
    test: List[Sample] = field(default_factory=list)
    source_desc: str = ""
    multilabel: bool = False  # samples carry label sets (tuples of class indices) instead of one class index

    def counts(self, split: str) -> List[int]:
        """Samples per class in one split (with label sets: the samples that hold each label), for summaries."""
        out = [0] * len(self.class_names)
        for _, label in getattr(self, split):
            for index in label if self.multilabel else (label,):
                out[index] += 1
        return out


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> List[List[int]]:
    """Indices of each part, class by class, so every part sees every class in about the same proportion.

    Per class, counts follow the largest-remainder rounding of n x fraction; then each nonzero-fraction part
    that got nothing takes one sample from the biggest part, while that part keeps at least one. A class with a
    single sample therefore lands in the biggest part (normally train).
    """
    fr = np.asarray(fractions, dtype=float)
    if fr.ndim != 1 or len(fr) == 0 or (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {list(fractions)}")
    fr = fr / fr.sum()
    labels_arr = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: List[List[int]] = [[] for _ in fr]
    for cls in np.unique(labels_arr):
        idx = rng.permutation(np.flatnonzero(labels_arr == cls))
        counts = _allocate(len(idx), fr)
        start = 0
        for p, c in enumerate(counts):
            parts[p].extend(int(i) for i in idx[start : start + c])
            start += c
    return [sorted(p) for p in parts]


def _allocate(n: int, fr: np.ndarray) -> List[int]:
    raw = n * fr
    counts = np.floor(raw).astype(int)
    # Ties go to the earlier part (train before val before test): a stable sort on the negated remainder.
    for p in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[p] += 1
    for p in np.flatnonzero(fr > 0):
        if counts[p] == 0:
            donor = int(np.argmax(counts))
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[p] += 1
    return counts.tolist()


def multilabel_split(label_sets: Sequence[Sequence[int]], fractions: Sequence[float], seed: int) -> List[List[int]]:
    """Indices of each part for samples with label sets, which cannot be stratified class by class.

    A seeded random split with the sizes stratified_split would give; then every label that only val/test hold
    moves one of its samples into train (while that part keeps at least one), so no label goes untrained.
    """
    fr = np.asarray(fractions, dtype=float)
    if fr.ndim != 1 or len(fr) == 0 or (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {list(fractions)}")
    order = np.random.default_rng(seed).permutation(len(label_sets)).tolist()
    parts: List[List[int]] = []
    start = 0
    for count in _allocate(len(order), fr / fr.sum()):
        parts.append(order[start : start + count])
        start += count
    trained = {label for i in parts[0] for label in label_sets[i]}
    for part in parts[1:]:
        for i in list(part):
            missing = set(label_sets[i]) - trained
            if missing and len(part) > 1:
                part.remove(i)
                parts[0].append(i)
                trained |= missing
    return [sorted(p) for p in parts]


def discover(data_cfg: Any, task: str = "multiclass") -> DataSplits:
    """The samples named by `data_cfg` (a DataConfig or its OmegaConf node), split into train/val[/test].

    Splits that the source does not define are drawn with `data.split_seed`, never the training seed, so runs
    with different seeds are compared on the same validation set. task=multilabel reads label sets, which
    only a CSV manifest can express.
    """
    # Imported here: those modules build on the helpers below, and a source costs nothing until it is chosen.
    from transfer_cli.data.elpv import from_elpv
    from transfer_cli.data.manifest import from_csv

    source = data_cfg.source
    if task == "multilabel" and source != "csv":
        raise TransferError(
            f"task=multilabel needs several labels per image, but data.source={source} gives each image one class",
            "list the images in a CSV with labels such as cat;dog: data=csv data.csv=/path/to/labels.csv",
        )
    if source == "imagefolder":
        splits = _from_imagefolder(data_cfg)
    elif source == "csv":
        splits = from_csv(data_cfg, task)
    elif source == "elpv":
        splits = from_elpv(data_cfg)
    else:
        raise TransferError(f"unknown data.source '{source}'", "use data.source=imagefolder|csv|elpv")
    _check(splits, allow_no_val=float(data_cfg.val_fraction) == 0)
    return splits


def _check(splits: DataSplits, allow_no_val: bool = False) -> None:
    if len(splits.class_names) < 2:
        names = ", ".join(splits.class_names) or "none"
        raise TransferError(
            f"found a single class ({names}) in {splits.source_desc}; a classifier needs at least 2",
            "add a folder (or label) for each class you want to tell apart",
        )
    if not splits.train:
        raise TransferError(f"the train split of {splits.source_desc} is empty", "add training images")
    # data.val_fraction=0 asks for no validation (train on all but the test split); anywhere else an empty
    # validation split is a mistake.
    if not splits.val and not allow_no_val:
        raise TransferError(
            f"the validation split of {splits.source_desc} is empty",
            "provide a val/ folder (or split=val rows), or set data.val_fraction=0.2",
        )


def split_fractions(data_cfg: Any, with_test: bool) -> List[float]:
    val = float(data_cfg.val_fraction)
    test = float(data_cfg.test_fraction) if with_test else 0.0
    if val < 0 or test < 0 or val + test >= 1:
        raise TransferError(
            f"data.val_fraction={val} and data.test_fraction={test} leave no training data",
            "keep data.val_fraction + data.test_fraction below 1, e.g. data.val_fraction=0.2",
        )
    return [1.0 - val - test, val, test]


def split_samples(
    samples: List[Sample], fractions: List[float], seed: int, multilabel: bool = False
) -> List[List[Sample]]:
    split = multilabel_split if multilabel else stratified_split
    parts = split([s[1] for s in samples], fractions, seed)
    return [[samples[i] for i in part] for part in parts]


# ---------------------------------------------------------------- imagefolder


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _list_images(folder: Path) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))  # in place: os.walk then skips them
        for name in sorted(filenames):
            if not _is_hidden(name) and name.lower().endswith(IMG_EXTENSIONS):
                found.append(os.path.join(dirpath, name))
    return found


def _class_folders(folder: Path) -> Dict[str, List[str]]:
    classes = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name)):
        images = _list_images(d)
        if not images:
            raise TransferError(
                f"class folder {d} holds no images ({', '.join(IMG_EXTENSIONS)})",
                f"add images to it or remove the folder {d.name}/",
            )
        classes[d.name] = images
    return classes


def _from_imagefolder(data_cfg: Any) -> DataSplits:
    if not data_cfg.root:
        raise TransferError("data.root is not set", "point it at your images: data.root=/path/to/images")
    root = Path(os.path.expanduser(str(data_cfg.root))).resolve()
    if not root.is_dir():
        raise TransferError(f"data.root {root} is not a folder", "check the path: data.root=/path/to/images")
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    split_dirs = {SPLIT_ALIASES[k]: v for k, v in sorted(subdirs.items()) if k in SPLIT_ALIASES}

    if "train" in split_dirs:
        layout = "train/" + "".join(f", {s}/" for s in ("val", "test") if s in split_dirs)
        per_split = {s: _class_folders(d) for s, d in split_dirs.items()}
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
            fr = split_fractions(data_cfg, with_test="test" not in samples)
            train, val, drawn_test = split_samples(train, fr, int(data_cfg.split_seed))
            test = test or drawn_test
    else:
        folders = _class_folders(root)
        if not folders:
            raise TransferError(
                f"no class subfolders under {root}",
                "arrange images as data.root/<class>/*.jpg or data.root/{train,val}/<class>/*.jpg",
            )
        class_names = sorted(folders)
        samples_all = [(p, i) for i, c in enumerate(class_names) for p in folders[c]]
        fr = split_fractions(data_cfg, with_test=True)
        train, val, test = split_samples(samples_all, fr, int(data_cfg.split_seed))
        layout = f"<class>/ split by split_seed={data_cfg.split_seed}"
    return DataSplits(class_names, train, val, test, f"imagefolder {root} ({layout})")


__all__ = ["Sample", "DataSplits", "discover", "stratified_split", "multilabel_split", "IMG_EXTENSIONS", "SPLITS"]
