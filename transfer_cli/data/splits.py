"""The samples of a run and how they are split into train / val / test, whichever source found them.

Splits a source does not define are drawn here, stratified and seeded by data.split_seed (never the training
seed), so runs with different seeds are compared on the same validation set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Sequence, Tuple, Union

import numpy as np

from transfer_cli.errors import TransferError

# (image path, class index); with task=multilabel (image path, tuple of the indices of its labels, maybe empty)
Sample = Tuple[str, Union[int, Tuple[int, ...]]]

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


def check_splits(splits: DataSplits, allow_no_val: bool = False) -> None:
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


def split_fractions(val_fraction: float, test_fraction: float, with_test: bool) -> List[float]:
    """[train, val, test] fractions for a source without its own split; test is 0 when it has a test split."""
    val = float(val_fraction)
    test = float(test_fraction) if with_test else 0.0
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


def fold_indices(labels: Sequence, k: int, seed: int, multilabel: bool = False) -> List[List[int]]:
    """k disjoint folds covering every index, seeded: each class dealt round the folds in turn (a class's count
    per fold differs by at most one, and so does each fold's size). Label sets cannot be dealt class by class:
    a seeded shuffle is dealt instead, then a label whose samples (two or more) all fell into one fold moves one
    of them to the smallest other fold, so no label goes untrained when that fold is val (multilabel_split's rule).
    """
    rng = np.random.default_rng(seed)
    if multilabel:
        order = rng.permutation(len(labels)).tolist()
    else:
        labels_arr = np.asarray(labels)
        order = [int(i) for cls in np.unique(labels_arr) for i in rng.permutation(np.flatnonzero(labels_arr == cls))]
    folds: List[List[int]] = [order[f::k] for f in range(k)]  # position j of the deal goes to fold j % k
    if multilabel:
        for label in sorted({lab for labs in labels for lab in labs}):
            holding = [f for f, part in enumerate(folds) if any(label in labels[i] for i in part)]
            if len(holding) == 1:
                owners = [i for i in folds[holding[0]] if label in labels[i]]
                if len(owners) > 1:
                    target = min((f for f in range(k) if f != holding[0]), key=lambda f: (len(folds[f]), f))
                    folds[holding[0]].remove(owners[-1])
                    folds[target].append(owners[-1])
    return [sorted(part) for part in folds]


def fold_splits(splits: DataSplits, folds: int, fold: int, seed: int) -> DataSplits:
    """data.folds=k, data.fold=i: the train and val samples pooled (a source's own val split included) and dealt
    into k folds (fold_indices, seeded by data.split_seed); fold i is val, the others train. The test split, held
    out as without folds, is untouched, so every fold's model is tested on the same images."""
    # The pool in path order: the folds depend on which samples it holds, not on how the source listed them.
    pool = sorted(splits.train + splits.val, key=lambda s: s[0])
    if len(pool) < folds:
        raise TransferError(f"data.folds={folds} needs at least {folds} train and val samples; "
                            f"{splits.source_desc} has {len(pool)}", "fewer folds, e.g. data.folds=2, or more images")
    parts = fold_indices([s[1] for s in pool], folds, seed, splits.multilabel)
    train = [pool[i] for f, part in enumerate(parts) if f != fold for i in part]
    desc = (f"{splits.source_desc}; train and val pooled into {folds} folds by split_seed={seed}, "
            f"fold {fold} is val")
    return replace(splits, train=sorted(train, key=lambda s: s[0]), val=[pool[i] for i in parts[fold]],
                   source_desc=desc)


__all__ = ["Sample", "DataSplits", "SPLITS", "SPLIT_ALIASES", "stratified_split", "multilabel_split",
           "split_fractions", "split_samples", "check_splits", "fold_indices", "fold_splits"]
