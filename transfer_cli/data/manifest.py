"""The `csv` data source: a manifest of image paths and labels, optionally with a split column.

A manifest suits data sets whose files are not arranged by class (exports from labelling tools, several
labellings of one image pool); each problem is reported with the CSV line that causes it. With task=multilabel
the label column holds a label set, "cat;dog" (data.label_sep), and an empty label means an image with none.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Dict, List, Tuple

from transfer_cli.data.splits import SPLIT_ALIASES, SPLITS, DataSplits, Sample, split_fractions, split_samples
from transfer_cli.errors import TransferError


def from_csv(csv_path: str | None, multilabel: bool, label_sep: str, val_fraction: float, test_fraction: float,
             split_seed: int) -> DataSplits:
    """Samples listed in the manifest `csv_path` (header path,label[,split]); without a split column the splits are
    drawn by `split_seed`. `multilabel`: the label column holds label sets separated by `label_sep`."""
    if not csv_path:
        raise TransferError("data.csv is not set", "point it at the manifest: data.csv=/path/to/labels.csv")
    path = Path(os.path.expanduser(str(csv_path))).resolve()
    if not path.is_file():
        raise TransferError(f"data.csv {path} does not exist", "check the path: data.csv=/path/to/labels.csv")
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheets often write a BOM
        reader = csv.DictReader(f)
        header = {(h or "").strip().lower(): h for h in reader.fieldnames or []}
        for col in ("path", "label"):
            if col not in header:
                raise TransferError(
                    f"{path} has no '{col}' column (header: {', '.join(reader.fieldnames or []) or 'empty'})",
                    "start the file with the header line: path,label[,split]",
                )
        has_split = "split" in header
        rows = []
        lines: List[int] = []  # the CSV line of each row, for messages
        missing = []
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            img = (row.get(header["path"]) or "").strip()
            label = (row.get(header["label"]) or "").strip()
            if not img or not (label or multilabel):  # an empty label set is a valid multi-label answer
                raise TransferError(f"{path} line {line}: empty path or label", "give every row a path and a label")
            split = "train"
            if has_split:
                raw = (row.get(header["split"]) or "").strip().lower()
                if raw not in SPLIT_ALIASES:
                    raise TransferError(
                        f"{path} line {line}: split '{raw}' is not train, val or test", "fix the split column"
                    )
                split = SPLIT_ALIASES[raw]
            full = Path(os.path.expanduser(img))
            full = full if full.is_absolute() else path.parent / full
            if not full.is_file():
                missing.append(f"line {line}: {full}")
            rows.append((str(full), label, split))
            lines.append(line)
    if missing:
        shown = "\n    ".join(missing[:20]) + (f"\n    ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise TransferError(
            f"{len(missing)} image(s) listed in {path} do not exist:\n    {shown}",
            "paths are relative to the CSV's folder (or absolute); fix or drop those rows",
        )
    if not rows:
        raise TransferError(f"{path} lists no images", "add rows: path,label[,split]")
    _each_image_once(rows, lines, path)
    fractions = split_fractions(val_fraction, test_fraction, True)
    if multilabel:
        return _label_sets(rows, has_split, label_sep, fractions, int(split_seed), path)
    class_names = sorted({r[1] for r in rows})
    c2i = {c: i for i, c in enumerate(class_names)}
    if not has_split:
        samples = [(p, c2i[lab]) for p, lab, _ in rows]
        train, val, test = split_samples(samples, fractions, int(split_seed))
        return DataSplits(class_names, train, val, test, f"csv {path} (split by split_seed={split_seed})")
    train_labels = {lab for _, lab, s in rows if s == "train"}
    extra = sorted({lab for _, lab, s in rows if s != "train"} - train_labels)
    if extra:
        raise TransferError(
            f"{path}: labels {', '.join(extra)} appear in val/test rows but never in train",
            "add training rows for them or drop those rows",
        )
    class_names = sorted(train_labels)
    c2i = {c: i for i, c in enumerate(class_names)}
    by_split: Dict[str, List[Sample]] = {s: [] for s in SPLITS}
    for p, lab, s in rows:
        by_split[s].append((p, c2i[lab]))
    return DataSplits(class_names, by_split["train"], by_split["val"], by_split["test"], f"csv {path}")


def _each_image_once(rows: List[Tuple[str, str, str]], lines: List[int], path: Path) -> None:
    """An image listed twice trains twice or leaks into val/test (same file in two splits), or carries two
    labels: each is an error naming the lines. The same file under two spellings counts as one."""
    seen: Dict[str, List[Tuple[int, str, str]]] = {}
    for (image, label, split), line in zip(rows, lines):
        seen.setdefault(os.path.realpath(image), []).append((line, label, split))
    repeated = {image: uses for image, uses in seen.items() if len(uses) > 1}
    if not repeated:
        return
    problems = []
    for image, uses in list(repeated.items())[:10]:
        splits, labels = {u[2] for u in uses}, {u[1] for u in uses}
        why = ("in two splits (" + ", ".join(sorted(splits)) + ")" if len(splits) > 1 else
               "with different labels (" + ", ".join(sorted(labels)) + ")" if len(labels) > 1 else "twice")
        problems.append(f"lines {', '.join(str(u[0]) for u in uses)}: {image} {why}")
    more = f"\n    ... and {len(repeated) - 10} more" if len(repeated) > 10 else ""
    raise TransferError(f"{path}: {len(repeated)} image(s) listed more than once:\n    " + "\n    ".join(problems) + more,
                        "list each image once, with its one label (or label set) and one split")


def _label_sets(rows: List[Tuple[str, str, str]], has_split: bool, label_sep: str, fractions: List[float],
                split_seed: int, path: Path) -> DataSplits:
    """task=multilabel: each row's label column as a set of labels; the classes are their union."""
    sep = str(label_sep)
    if not sep:
        raise TransferError("data.label_sep is empty", "set the character between labels: data.label_sep=';'")
    sets = [(p, {lab.strip() for lab in text.split(sep)} - {""}, s) for p, text, s in rows]
    trained = {lab for _, labels, s in sets if s == "train" for lab in labels}
    extra = sorted({lab for _, labels, s in sets if s != "train" for lab in labels} - trained)
    if has_split and extra:
        raise TransferError(
            f"{path}: labels {', '.join(extra)} appear in val/test rows but never in train",
            "add training rows for them or drop those labels",
        )
    class_names = sorted(trained) if has_split else sorted(trained | set(extra))
    c2i = {c: i for i, c in enumerate(class_names)}
    samples = [(p, tuple(sorted(c2i[lab] for lab in labels)), s) for p, labels, s in sets]
    unlabelled = sum(1 for _, labels, _ in samples if not labels)
    desc = (
        f"csv {path} (multi-label, labels separated by {sep!r}; "
        f"{unlabelled} image(s) with an empty label, i.e. none of the labels"
    )
    if has_split:
        by_split: Dict[str, List[Sample]] = {s: [] for s in SPLITS}
        for p, labels, s in samples:
            by_split[s].append((p, labels))
        parts = [by_split[s] for s in SPLITS]
        desc += ")"
    else:
        parts = split_samples([(p, labels) for p, labels, _ in samples], fractions, split_seed, True)
        desc += f"; split by split_seed={split_seed})"
    return DataSplits(class_names, *parts, source_desc=desc, multilabel=True)


__all__ = ["from_csv"]
