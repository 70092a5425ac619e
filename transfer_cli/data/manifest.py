"""The `csv` data source: a manifest of image paths and labels, optionally with a split column.

A manifest suits data sets whose files are not arranged by class (exports from labelling tools, several
labellings of one image pool); each problem is reported with the CSV line that causes it.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Dict, List

from transfer_cli.data.sources import SPLIT_ALIASES, SPLITS, DataSplits, Sample, split_fractions, split_samples
from transfer_cli.errors import TransferError


def from_csv(data_cfg: Any) -> DataSplits:
    """Samples listed in the data.csv manifest (header path,label[,split])."""
    if not data_cfg.csv:
        raise TransferError("data.csv is not set", "point it at the manifest: data.csv=/path/to/labels.csv")
    path = Path(os.path.expanduser(str(data_cfg.csv))).resolve()
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
        missing = []
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            img = (row.get(header["path"]) or "").strip()
            label = (row.get(header["label"]) or "").strip()
            if not img or not label:
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
    if missing:
        shown = "\n    ".join(missing[:20]) + (f"\n    ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise TransferError(
            f"{len(missing)} image(s) listed in {path} do not exist:\n    {shown}",
            "paths are relative to the CSV's folder (or absolute); fix or drop those rows",
        )
    if not rows:
        raise TransferError(f"{path} lists no images", "add rows: path,label[,split]")
    class_names = sorted({r[1] for r in rows})
    c2i = {c: i for i, c in enumerate(class_names)}
    if not has_split:
        samples = [(p, c2i[lab]) for p, lab, _ in rows]
        train, val, test = split_samples(samples, split_fractions(data_cfg, True), int(data_cfg.split_seed))
        return DataSplits(class_names, train, val, test, f"csv {path} (split by split_seed={data_cfg.split_seed})")
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


__all__ = ["from_csv"]
