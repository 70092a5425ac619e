"""task=multilabel: label sets from a CSV, multi-hot batches, BCE training with mAP/F1, label-set predictions."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transfer_cli.assembly.data import discover, image_data
from transfer_cli.assembly.module import criterion_for
from transfer_cli.config.compose import as_schema, compose
from transfer_cli.config.schema import DataConfig, TrainConfig
from transfer_cli.data.datamodule import collate_drop_bad
from transfer_cli.data.images import BadImage
from transfer_cli.data.splits import multilabel_split
from transfer_cli.errors import TransferError
from transfer_cli.train import train
from transfer_cli.training.metrics import build_metrics
from transfer_cli.training.predictions import decode_predictions

LABELS = ("blue", "green", "red")  # each label lights up one colour channel, so pooled features can tell them apart
CHANNEL = {"red": 0, "green": 1, "blue": 2}


def label_image(labels, size: int, rng: np.random.Generator) -> Image.Image:
    base = np.full(3, 30, dtype=np.int16)
    for lab in labels:
        base[CHANNEL[lab]] = 220
    noise = rng.integers(-20, 21, size=(size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), mode="RGB")


def write_manifest(folder: Path, rows, split_column: bool = False, size: int = 32) -> Path:
    """rows: (label set, split); images go to folder/img/, the CSV lists them with labels joined by ';'."""
    rng = np.random.default_rng(5)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    path = folder / "labels.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"] + (["split"] if split_column else []))
        for i, (labels, split) in enumerate(rows):
            label_image(labels, size, rng).save(folder / "img" / f"{i:03d}.png")
            writer.writerow([f"img/{i:03d}.png", ";".join(labels)] + ([split] if split_column else []))
    return path


def every_label_set(copies: int):
    """Each subset of LABELS (the empty one too), `copies` times."""
    subsets = [s for k in range(len(LABELS) + 1) for s in itertools.combinations(LABELS, k)]
    return [(s, "train") for s in subsets for _ in range(copies)]


def data_cfg(**kw) -> DataConfig:
    kw.setdefault("num_workers", 0)
    return DataConfig(source="csv", **kw)


# ---------------------------------------------------------------- data


def test_csv_label_sets_become_multi_hot_batches(tmp_path):
    rows = [(("red", "blue"), "train"), (("green",), "train"), ((), "train"), (("blue",), "val"),
            (("red", "green"), "val"), ((), "val")]
    path = write_manifest(tmp_path, rows, split_column=True)
    # Whitespace and doubled separators around labels are the spreadsheet noise a manifest tolerates.
    text = path.read_text().replace("img/001.png,green", "img/001.png, green ;;")
    path.write_text(text)

    splits = discover(data_cfg(csv=str(path)), "multilabel")
    assert splits.multilabel and splits.class_names == ["blue", "green", "red"]
    assert [labels for _, labels in splits.train] == [(0, 2), (1,), ()]
    assert [labels for _, labels in splits.val] == [(0,), (1, 2), ()]
    assert splits.counts("train") == [1, 1, 1] and splits.counts("val") == [1, 1, 1]
    assert "2 image(s) with an empty label" in splits.source_desc

    dm = image_data(TrainConfig(seed=0, data=data_cfg(csv=str(path), batch_size=4)), splits,
                    {"input_size": (3, 16, 16), "interpolation": "bilinear", "crop_pct": 1.0,
                     "mean": (0.5,) * 3, "std": (0.5,) * 3})
    images, target = dm.strip_bad(next(iter(dm.loader("val", augment=False))))
    assert images.shape == (3, 3, 16, 16)
    assert target.dtype == torch.float32
    assert target.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]

    # The same file as a multiclass manifest: the label column is one class name, and empty labels are errors.
    with pytest.raises(TransferError, match="empty path or label"):
        discover(data_cfg(csv=str(path)))


def test_collate_keeps_target_shape_when_every_image_is_bad():
    batch = collate_drop_bad([BadImage("x.png", "broken")], image_shape=(3, 8, 8), num_labels=4)
    assert batch.images.shape == (0, 3, 8, 8) and batch.labels.shape == (0, 4) and batch.bad == [("x.png", "broken")]
    assert collate_drop_bad([BadImage("x.png", "broken")], image_shape=(3, 8, 8)).labels.dtype == torch.long


def test_custom_separator_and_val_labels_unseen_in_train(tmp_path):
    path = write_manifest(tmp_path, [(("red",), "train"), (("green",), "train"), (("blue",), "val")],
                          split_column=True)
    with pytest.raises(TransferError, match="blue appear in val/test rows but never in train"):
        discover(data_cfg(csv=str(path)), "multilabel")
    path.write_text(path.read_text().replace(",blue,", ",red|green,"))
    splits = discover(data_cfg(csv=str(path), label_sep="|"), "multilabel")
    assert splits.class_names == ["green", "red"] and splits.val[0][1] == (0, 1)


def test_multilabel_split_is_seeded_and_trains_every_label():
    label_sets = [(0,), (1,), (0, 1), ()] * 10 + [(2,)]  # label 2 exists once: it has to be trained on
    for seed in range(20):
        parts = multilabel_split(label_sets, [0.6, 0.3, 0.1], seed)
        assert sorted(i for p in parts for i in p) == list(range(len(label_sets)))
        assert {lab for i in parts[0] for lab in label_sets[i]} == {0, 1, 2}
        assert all(parts), "every part with a nonzero fraction keeps a sample"
        assert 22 <= len(parts[0]) <= 26
    assert multilabel_split(label_sets, [0.6, 0.3, 0.1], 3) == multilabel_split(label_sets, [0.6, 0.3, 0.1], 3)
    assert multilabel_split(label_sets, [0.6, 0.3, 0.1], 3) != multilabel_split(label_sets, [0.6, 0.3, 0.1], 4)


@pytest.mark.parametrize("source", ["imagefolder", "elpv"])
def test_multilabel_needs_a_csv(tmp_path, tiny_imagefolder, source):
    cfg = compose(["~experiment", f"data={source}", f"data.root={tiny_imagefolder}", "task=multilabel"])
    with pytest.raises(TransferError) as err:
        discover(cfg.data, cfg.task)
    assert f"data.source={source}" in err.value.message and "data=csv" in err.value.fix


def test_task_and_threshold_are_checked_when_composing():
    with pytest.raises(TransferError, match="did you mean 'multilabel'"):
        compose(["~experiment", "task=multilable"])
    cfg = compose(["~experiment", "task=multilabel", "multilabel_threshold=1.5"])
    with pytest.raises(TransferError, match="multilabel_threshold=1.5"):
        build_metrics(cfg.task, 3, cfg.multilabel_threshold)


def test_multilabel_loss_is_bce_and_refuses_single_class_recipes():
    cfg = as_schema(compose(["~experiment", "task=multilabel"]))
    logits, target = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    expected = -(torch.log(torch.sigmoid(logits[0, 0])) + torch.log(1 - torch.sigmoid(logits[0, 1]))) / 2
    assert float(criterion_for(cfg, 2)(logits, target)) == pytest.approx(float(expected))
    for override in ("augmentation.label_smoothing=0.1", "data.class_weights=auto", "augmentation.mixup_alpha=0.2"):
        with pytest.raises(TransferError, match="task=multilabel does not support"):
            criterion_for(as_schema(compose(["~experiment", "task=multilabel", override])), 2, [3, 4])


# ---------------------------------------------------------------- metrics and predictions


def test_label_set_metrics_score_logits_against_hard_labels():
    metrics = build_metrics("multilabel", 3, 0.5)["val_metrics"]
    target = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])  # label 2 never occurs
    # Logits all inside [0, 1]: only an explicit sigmoid makes 0.2 mean "no" (sigmoid 0.55 >= 0.5 is "yes").
    logits = torch.tensor([[0.9, -2, -2], [-2, 0.9, -2], [0.9, 0.9, -2], [-2, -2, -2]])
    scores = metrics(logits, target)
    assert {k: float(v) for k, v in scores.items()} == {"val/acc": 1.0, "val/f1": 1.0, "val/f1_micro": 1.0,
                                                      "val/mAP": 1.0}
    metrics.reset()
    wrong = logits.clone()
    wrong[3, 2] = 2.0  # one false positive on the label that never occurs, and a ranking still perfect for 0 and 1
    soft = target * 0.9 + 0.05  # smoothed targets still count as the labels they came from
    scores = {k: float(v) for k, v in metrics(wrong, soft).items()}
    assert scores["val/acc"] == 0.75 and scores["val/mAP"] == 1.0  # mAP over the labels that occur
    assert scores["val/f1"] == pytest.approx(2 / 3) and scores["val/f1_micro"] == pytest.approx(8 / 9)
    assert "train/mAP" not in build_metrics("multilabel", 3, 0.5)["train_metrics"].keys()


def test_decode_predictions_gives_label_sets():
    names = ["blue", "green", "red"]
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, -2.0, -4.0], [0.0, 0.1, -0.1]])
    multi = decode_predictions(logits, names, "multilabel", threshold=0.5)
    assert [p.labels for p in multi] == [["blue", "red"], [], ["blue", "green"]]  # sigmoid(0) = 0.5 is in
    assert multi[0].scores == pytest.approx(torch.sigmoid(logits[0]).tolist())
    strict = decode_predictions(logits, names, "multilabel", threshold=0.7)
    assert [p.labels for p in strict] == [["blue"], [], []]
    single = decode_predictions(logits, names, "multiclass")
    assert [p.labels for p in single] == [["blue"], ["green"], ["green"]]
    assert sum(single[1].scores) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        decode_predictions(logits[:, :2], names, "multilabel")


# ---------------------------------------------------------------- training


def metric_rows(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


@pytest.mark.parametrize("transfer,augmentation,cached", [("fine_tune", "light", False),
                                                          ("feature_extract", "none", True)])
def test_multilabel_trains_and_reports_mAP(tmp_path, transfer, augmentation, cached):
    path = write_manifest(tmp_path / "data", every_label_set(copies=4))  # 32 images, 4 of them with no label
    epochs = 2 if not cached else 5
    cfg = compose([
        "experiment=multilabel_csv", f"data.csv={path}", "model.backbone=test_efficientnet", "model.weights=null",
        "model.pretrained=false", "data.image_size=32", "data.batch_size=8", "data.num_workers=0",
        "data.val_fraction=0.25", "data.test_fraction=0.15", f"transfer={transfer}", f"augmentation={augmentation}",
        "optimizer.lr=0.02", "scheduler.warmup_epochs=0", "trainer=cpu", f"trainer.max_epochs={epochs}",
        "transfer.head_solver=sgd",
        "callbacks.rich_progress=false", "trainer.enable_progress_bar=false", f"paths.output_dir={tmp_path / 'run'}",
    ])
    summary = train(cfg)
    run = tmp_path / "run"
    assert summary["feature_cache"] is cached and summary["task"] == "multilabel"
    assert summary["class_names"] == list(LABELS)
    val_map = metric_rows(run, "val/mAP")
    assert len(val_map) == epochs and all(0.0 < v <= 1.0 for v in val_map)
    assert summary["val_mAP"] == pytest.approx(max(val_map))  # the monitor of the experiment picks the best epoch
    for key in ("val/f1", "val/f1_micro", "val/acc", "train/f1", "train/acc"):
        assert len(metric_rows(run, key)) == epochs, key
    assert 0.0 <= summary["val_acc"] <= 1.0 and 0.0 <= summary["val_f1"] <= 1.0
    assert summary["test_size"] > 0 and 0.0 < summary["test_mAP"] <= 1.0
    if cached:  # the head alone, on fixed features: the binary cross-entropy has to go down
        losses = metric_rows(run, "train/loss_epoch")
        assert losses[-1] < losses[0]

    best = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=True)
    meta = best["transfer"]
    assert meta["task"] == "multilabel" and meta["multilabel_threshold"] == 0.5
    assert meta["class_names"] == list(LABELS)
    # no temperature per label: skipped, and said so, rather than one softmax temperature on sigmoids
    assert summary["calibration"]["skipped"].startswith("task=multilabel") and "calibration" not in meta
    head_out = [v.shape[0] for k, v in best["state_dict"].items() if k.startswith("model.head.") and v.ndim == 2]
    assert head_out[-1] == len(LABELS)
