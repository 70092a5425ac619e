"""k-fold cross-validation: data.folds / data.fold deal the non-test samples into folds, and `transfer kfold` trains
every fold, continues when run again, and leaves kfold.json and an ensemble of the fold models."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import pytest
from conftest import tiny_run_overrides, transfer
from test_bad_inputs import refused

from transfer_cli.assembly.sources import discover
from transfer_cli.config.schema import DataConfig
from transfer_cli.data.splits import fold_indices

# ---------------------------------------------------------------- the folds


def test_folds_partition_every_index_stratified_balanced_and_seeded():
    labels = [0] * 13 + [1] * 7 + [2] * 3
    folds = fold_indices(labels, 5, seed=0)
    assert sorted(i for part in folds for i in part) == list(range(len(labels)))  # each index in one fold
    sizes = [len(part) for part in folds]
    assert max(sizes) - min(sizes) <= 1
    for cls, n in Counter(labels).items():  # each class spread evenly: n // k or n // k + 1 per fold
        per_fold = [sum(labels[i] == cls for i in part) for part in folds]
        assert set(per_fold) <= {n // 5, n // 5 + 1} and sum(per_fold) == n
    assert fold_indices(labels, 5, seed=0) == folds
    assert fold_indices(labels, 5, seed=1) != folds


def test_label_sets_are_dealt_so_that_a_label_of_two_samples_trains_in_every_fold():
    # label 3 on two samples only: whichever fold validates one of them, the other trains
    label_sets = [(0,), (1,), (0, 1), (), (0,), (1,), (3,), (0, 3), (1,), (0,)]
    for seed in range(20):
        folds = fold_indices(label_sets, 3, seed=seed, multilabel=True)
        assert sorted(i for part in folds for i in part) == list(range(len(label_sets)))
        assert sum(any(3 in label_sets[i] for i in part) for part in folds) == 2, seed


def test_each_fold_validates_its_share_of_the_pool_and_the_test_split_stays(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "flat", classes=("a", "b", "c"), per_class=12, layout="flat", size=8)
    plain = discover(DataConfig(root=str(root), val_fraction=0.2, test_fraction=0.25, split_seed=3))
    pool = sorted(plain.train + plain.val)
    folds = [discover(DataConfig(root=str(root), val_fraction=0.2, test_fraction=0.25, split_seed=3, folds=3,
                                 fold=i)) for i in range(3)]
    for s in folds:
        assert s.test == plain.test  # held out exactly as without folds
        assert sorted(s.train + s.val) == pool and not set(s.train) & set(s.val)
        assert s.counts("val") == [3, 3, 3]  # 9 pool images per class, 3 per fold
    assert sorted(x for s in folds for x in s.val) == pool  # every pool sample is val exactly once
    again = discover(DataConfig(root=str(root), val_fraction=0.2, test_fraction=0.25, split_seed=3, folds=3, fold=1))
    assert again.val == folds[1].val
    other = discover(DataConfig(root=str(root), val_fraction=0.2, test_fraction=0.25, split_seed=4, folds=3, fold=1))
    assert other.val != folds[1].val and other.test != plain.test  # split_seed draws test and folds alike


def test_a_source_with_its_own_val_split_pools_it(tiny_imagefolder):
    plain = discover(DataConfig(root=str(tiny_imagefolder)))
    folds = [discover(DataConfig(root=str(tiny_imagefolder), folds=2, fold=i)) for i in range(2)]
    assert sorted(folds[0].val + folds[1].val) == sorted(plain.train + plain.val)
    assert "pooled into 2 folds" in folds[0].source_desc


# ---------------------------------------------------------------- refused before torch


@pytest.mark.parametrize("command, args, expect", [
    ("kfold", ["k=1"], "k=1"),
    ("kfold", ["data.fold=1"], "sets data.fold itself"),
    ("kfold", ["k=3", "data.folds=4"], "sets data.folds itself"),
    ("kfold", ["optimizer.lr=1e-3,3e-4"], "is a sweep"),
    ("train", ["data.folds=1"], "data.folds=1 is one fold"),
    ("train", ["data.folds=3", "data.fold=3"], "data.fold=3 is not a fold of data.folds=3"),
    ("train", ["data.fold=2"], "data.fold=2 picks a fold, but data.folds=0"),
])
def test_bad_fold_keys_are_refused_before_torch(tmp_path, command, args, expect):
    out = transfer(command, *args, cwd=tmp_path, probe=True)
    refused(out, expect)
    assert "HEAVY []" in out.stderr


def test_more_folds_than_images_are_refused_before_torch(tiny_imagefolder, tmp_path):
    out = transfer("kfold", "k=30", f"output={tmp_path / 'kf'}", *tiny_run_overrides(tiny_imagefolder), cwd=tmp_path,
                   probe=True)
    refused(out, "data.folds=30 needs at least 30 train and val samples", "has 24")
    assert "HEAVY []" in out.stderr and not (tmp_path / "kf" / "fold_0").exists()


# ---------------------------------------------------------------- transfer kfold, end to end


@pytest.mark.slow
def test_kfold_trains_each_fold_once_and_leaves_their_ensemble(make_image_folder, tmp_path, capsys):
    from transfer_cli.cli import main
    from transfer_cli.commands.evaluate import evaluate

    root = make_image_folder(tmp_path / "data", per_class=6, layout="flat")
    folder = tmp_path / "kf"
    args = ["kfold", "k=2", f"output={folder}",
            *tiny_run_overrides(root, None, "trainer.max_epochs=1", "data.test_fraction=0.25")]
    root_logger = logging.getLogger()
    handlers = list(root_logger.handlers)
    try:
        main(args)  # in this process, which then shares torch's import with the eval below
    finally:  # each fold's Hydra run pointed the root logger at its train.log: give later tests theirs back
        for handler in set(root_logger.handlers) - set(handlers):
            handler.close()
        root_logger.handlers[:] = handlers
    assert json.loads((folder / "ensemble.json").read_text()) == {"members": ["fold_0", "fold_1"], "weights": None}
    record = json.loads((folder / "kfold.json").read_text())
    summaries = [json.loads((folder / f"fold_{i}" / "summary.json").read_text()) for i in range(2)]
    assert [f["val_acc"] for f in record["folds"]] == [s["val_acc"] for s in summaries]
    assert record["metrics"]["val_acc"]["mean"] == pytest.approx((summaries[0]["val_acc"] + summaries[1]["val_acc"]) / 2)
    assert record["metrics"]["val_acc"]["std"] == pytest.approx(abs(summaries[0]["val_acc"] - summaries[1]["val_acc"])
                                                                / 2 ** 0.5)
    assert record["metrics"]["test_acc"]["values"] == [s["test_acc"] for s in summaries]
    assert [s["val_size"] for s in summaries] == [4, 4] and [s["test_size"] for s in summaries] == [4, 4]
    assert "mean ± std" in capsys.readouterr().out

    checkpoints = sorted(folder.glob("fold_*/checkpoints/*.ckpt"))
    stamps = {p: p.stat().st_mtime_ns for p in checkpoints}
    again = transfer(*args, cwd=tmp_path, probe=True)  # nothing left to train: torch never loads
    assert again.returncode == 0, again.stderr[-3000:]
    assert "HEAVY []" in again.stderr and again.stdout.count("finished earlier") >= 2
    assert {p: p.stat().st_mtime_ns for p in sorted(folder.glob("fold_*/checkpoints/*.ckpt"))} == stamps
    assert json.loads((folder / "kfold.json").read_text())["metrics"] == record["metrics"]

    other = transfer(*args[:-1], "data.test_fraction=0.5", cwd=tmp_path, probe=True)  # another config, same folder
    refused(other, "holds a k-fold of k=2 with other overrides")
    refused(transfer("kfold", "k=2", f"output={folder / 'fold_0'}", *args[3:], cwd=tmp_path, probe=True),
            "is a training run's dir")

    report = evaluate(str(folder), top_losses=0)  # `transfer eval ckpt=<folder>`: the folds' models as one ensemble, on test
    members = report["ensemble"]["members"]
    assert [Path(m["run_dir"]).name for m in members] == ["fold_0", "fold_1"]
    assert [m["metrics"]["acc"] for m in members] == pytest.approx([s["test_acc"] for s in summaries])
    assert os.path.isfile(folder / "eval" / "eval_report.json")
