"""Where the labelled samples come from (data=<name>): discovery only, paths and labels, no torch import, so
`transfer data-report` runs without it. assembly/data.py builds the loaders on top."""

from __future__ import annotations

import logging
from typing import Callable

from transfer_cli.config.schema import DataConfig
from transfer_cli.data.elpv import from_elpv
from transfer_cli.data.imagefolder import from_imagefolder
from transfer_cli.data.manifest import from_csv
from transfer_cli.data.splits import DataSplits, check_splits, fold_splits
from transfer_cli.errors import TransferError

log = logging.getLogger("transfer_cli")

# data=<name> (data.source): where the labelled samples come from
SOURCES: dict[str, Callable[[DataConfig, str], DataSplits]] = {
    "imagefolder": lambda d, task: from_imagefolder(d.root, d.val_fraction, d.test_fraction, d.split_seed),
    "csv": lambda d, task: from_csv(d.csv, task == "multilabel", d.label_sep, d.val_fraction, d.test_fraction,
                                    d.split_seed),
    "elpv": lambda d, task: from_elpv(d.elpv_task, d.elpv_cell_type, d.val_fraction, d.test_fraction, d.split_seed),
}


def discover(data: DataConfig, task: str = "multiclass") -> DataSplits:
    """The samples the data group names, split into train/val[/test].

    Splits that the source does not define are drawn with data.split_seed, never the training seed, so runs with
    different seeds are compared on the same validation set. task=multilabel reads label sets, which only a CSV
    manifest can express.
    """
    if task == "multilabel" and data.source != "csv":
        raise TransferError(
            f"task=multilabel needs several labels per image, but data.source={data.source} gives each image one "
            "class",
            "list the images in a CSV with labels such as cat;dog: data=csv data.csv=/path/to/labels.csv",
        )
    splits = SOURCES[data.source](data, task)
    if data.folds:  # k-fold: the split the source made, with its train and val pooled and dealt into folds
        held, splits = len(splits.val), fold_splits(splits, data.folds, data.fold, data.split_seed)
        log.info("data.folds=%d: fold %d (%d samples) is val, the other folds (%d) train; the source's val split "
                 "(%d samples) joined the pool; test (%d) held out as without folds", data.folds, data.fold,
                 len(splits.val), len(splits.train), held, len(splits.test))
    # data.val_fraction=0 asks for no validation (train on all but the test split)
    check_splits(splits, allow_no_val=float(data.val_fraction) == 0 and not data.folds)
    return splits


__all__ = ["SOURCES", "discover"]
