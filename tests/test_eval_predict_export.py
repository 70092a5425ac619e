"""transfer eval / predict / export on a checkpoint of a real tiny run, and the run's curves.png."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import _make_image_folder, tiny_cfg, transfer, write_class_images
from PIL import Image

from transfer_cli.commands.evaluate import evaluate
from transfer_cli.commands.export import export
from transfer_cli.config.args import Option, parse_command_args
from transfer_cli.commands.predict import predict
from transfer_cli.commands.restore import restore
from transfer_cli.data.images import load_rgb
from transfer_cli.data.transforms import eval_transform
from transfer_cli.errors import TransferError
from transfer_cli.plots import epoch_series
from transfer_cli.train import train

CLASSES = ("cat", "dog", "red", "green", "blue")  # five, so top-5 accuracy is reported


# A linear probe on cached features: the fastest run that leaves real checkpoints.
PROBE = ("trainer.max_epochs=2", "augmentation=none", "transfer=feature_extract", "optimizer.lr=0.05")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One trained run shared by every test here: 5 classes, train/val/test folders, 32 px."""
    tmp = tmp_path_factory.mktemp("eval")
    root = _make_image_folder(tmp / "data", classes=CLASSES, per_class=4)
    rng = np.random.default_rng(7)
    for k, c in enumerate(CLASSES):
        write_class_images(root / "test" / c, k, 2, 32, rng)
    summary = train(tiny_cfg(tmp, root, *PROBE, "transfer.cache_features=false"))
    return summary, tmp / "run", root


def test_train_writes_curves(tiny_run):
    _, run_dir, _ = tiny_run
    with Image.open(run_dir / "curves.png") as img:
        assert img.format == "PNG" and img.width > 300


def test_epoch_series_keeps_the_last_value_of_a_re_logged_epoch(tmp_path):
    # What a resumed run's appended metrics.csv looks like: epoch 1 logged, interrupted, logged again.
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss_epoch,val/acc\n0,3,1.0,\n0,3,,0.5\n1,7,0.9,\n1,7,0.8,0.6\n2,11,0.7,0.7\n")
    series = epoch_series(path)
    assert series["train/loss_epoch"] == {0: 1.0, 1: 0.8, 2: 0.7}
    assert series["val/acc"] == {0: 0.5, 1: 0.6, 2: 0.7}


def test_eval_reports_the_trainers_accuracy(tiny_run, tmp_path):
    summary, run_dir, _ = tiny_run
    report = evaluate(run_dir, output=tmp_path / "test")  # default split: test, as the trainer's test run
    assert report["split"] == "test" and report["num_images"] == 10
    assert report["metrics"]["acc"] == pytest.approx(summary["test_acc"], abs=1e-6)
    assert report["checkpoint"] == summary["best_checkpoint"]
    assert "top5_acc" in report["metrics"]
    on_disk = json.loads((tmp_path / "test" / "eval_report.json").read_text())
    assert on_disk["metrics"] == report["metrics"]
    per_class = {row["class"]: row for row in on_disk["per_class"]}
    assert set(per_class) == set(CLASSES) and all(row["support"] == 2 for row in per_class.values())
    matrix = np.array(on_disk["confusion_matrix"])
    assert matrix.shape == (5, 5) and matrix.sum() == 10
    assert np.trace(matrix) / 10 == pytest.approx(report["metrics"]["acc"], abs=1e-6)
    recall = [per_class[c]["recall"] for c in on_disk["class_names"]]
    assert np.allclose(recall, np.diag(matrix) / matrix.sum(axis=1))
    with Image.open(tmp_path / "test" / "confusion_matrix.png") as img:
        assert img.format == "PNG"

    val = evaluate(run_dir, split="val", output=tmp_path / "val")  # best.ckpt was chosen by this number
    assert val["metrics"]["acc"] == pytest.approx(summary["val_acc"], abs=1e-6)


def test_test_ckpt_last_scores_the_final_weights(tiny_run, tmp_path):
    _, _, root = tiny_run
    summary = train(tiny_cfg(tmp_path, root, *PROBE, "trainer.max_epochs=3", "callbacks.test_ckpt=last",
                             "transfer.head_solver=sgd"))
    assert summary["test_checkpoint"] == summary["last_checkpoint"] != summary["best_checkpoint"]
    last = torch.load(summary["last_checkpoint"], map_location="cpu", weights_only=True)
    assert last["epoch"] == 2  # the final epoch's weights, whatever validation preferred
    report = evaluate(summary["last_checkpoint"], output=tmp_path / "eval")
    assert report["metrics"]["acc"] == pytest.approx(summary["test_acc"], abs=1e-6)


def test_eval_refuses_data_with_classes_the_checkpoint_never_saw(tiny_run, tmp_path, make_image_folder):
    _, run_dir, _ = tiny_run
    other = make_image_folder(tmp_path / "zoo", classes=("cat", "zebra"), per_class=2)
    with pytest.raises(TransferError, match="zebra"):
        evaluate(run_dir, [f"data.root={other}"], output=tmp_path / "out")


def test_arguments_are_checked_with_did_you_mean():
    options = {"ckpt": Option(str, required=True), "split": Option(str, None, choices=("test", "val"))}
    with pytest.raises(TransferError, match="did you mean split"):
        parse_command_args("eval", ["ckpt=x", "splt=val"], options, ("data.",))
    with pytest.raises(TransferError, match="needs ckpt="):
        parse_command_args("eval", ["split=val"], options, ("data.",))
    with pytest.raises(TransferError, match="optimizer.lr"):  # training settings come from the checkpoint
        parse_command_args("eval", ["ckpt=x", "optimizer.lr=1"], options, ("data.",))
    with pytest.raises(TransferError, match="data.batch_size"):  # a mistyped key of an allowed group
        parse_command_args("eval", ["ckpt=x", "data.bach_size=3"], options, ("data.",))
    values, overrides = parse_command_args("eval", ["ckpt=x", "split=val", "data.batch_size=3"], options, ("data.",))
    assert values == {"ckpt": "x", "split": "val"} and overrides == ["data.batch_size=3"]


def test_predict_lists_unreadable_images_and_gives_the_models_calibrated_probabilities(tiny_run, tmp_path):
    _, run_dir, root = tiny_run
    images = sorted((root / "test").rglob("*.png"))
    corrupt = root / "test" / "cat" / "zz_corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    try:
        result = predict(run_dir, root / "test", tmp_path / "predictions.csv", topk=3)
    finally:
        corrupt.unlink()
    assert result.bad and result.bad[0][0] == str(corrupt)
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    assert len(rows) == len(images) + 1
    assert rows[str(corrupt)]["error"] and not rows[str(corrupt)]["label"]

    restored = restore(run_dir)
    transform = eval_transform(restored.data_config)
    batch = torch.stack([transform(load_rgb(str(p))) for p in images])
    with torch.no_grad():
        logits = restored.model(batch)
    # the probabilities are the checkpoint's calibrated ones: softmax(logits / T), T fitted on val after training
    stored = torch.load(restored.checkpoint, map_location="cpu", weights_only=True)["transfer"]["calibration"]
    temperature = stored["temperature"]
    assert temperature != 1.0
    raw = predict(run_dir, root / "test", tmp_path / "raw.csv", topk=3, calibrated=False)
    raw_rows = {row["path"]: row for row in raw.rows}
    for path, z in zip(images, logits):
        row, p = rows[str(path)], (z / temperature).softmax(dim=-1)
        assert row["error"] == "" and row["decision"] == "argmax"
        assert float(row["temperature"]) == pytest.approx(temperature, rel=1e-5)
        assert row["label"] == row["top1_label"] == restored.class_names[int(p.argmax())]
        assert float(row["probability"]) == pytest.approx(float(p.max()), abs=1e-5)
        assert float(row["top1_prob"]) >= float(row["top2_prob"]) >= float(row["top3_prob"])
        assert float(raw_rows[str(path)]["probability"]) == pytest.approx(float(z.softmax(-1).max()), abs=1e-5)
        assert raw_rows[str(path)]["temperature"] == "1" and raw_rows[str(path)]["label"] == row["label"]


@pytest.mark.slow  # the torch.export-based ONNX exporter takes ~15 s even for the tiny network
def test_export_onnx_matches_pytorch_and_carries_its_metadata(tiny_run, tmp_path):
    import onnxruntime

    _, run_dir, root = tiny_run
    result = export(run_dir, "onnx", tmp_path / "model.onnx")
    assert result.agreement.close and result.agreement.top1_same == result.agreement.samples == 4
    restored = restore(run_dir)
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == restored.class_names
    embedded = json.loads(meta["transfer"])
    assert embedded["input_size"] == [3, 32, 32] and embedded["mean"] == list(restored.data_config["mean"])
    assert json.loads(result.sidecar.read_text())["class_names"] == restored.class_names
    # Real images at a batch size the export never saw (the batch axis is dynamic).
    transform = eval_transform(embedded)
    batch = torch.stack([transform(load_rgb(str(p))) for p in sorted((root / "test").rglob("*.png"))[:5]])
    got = session.run(["logits"], {"images": batch.numpy()})[0]
    with torch.no_grad():
        expected = restored.model(batch).numpy()
    assert got.shape == (5, 5) and np.abs(got - expected).max() <= 1e-4


def test_export_torchscript_matches_pytorch_and_carries_its_metadata(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    result = export(run_dir, "torchscript", tmp_path / "model.pt")
    assert result.agreement.close and result.agreement.top1_same == result.agreement.samples == 4
    extra = {"transfer.json": ""}
    loaded = torch.jit.load(str(result.path), _extra_files=extra)
    meta = json.loads(extra["transfer.json"])
    restored = restore(run_dir)
    assert meta["class_names"] == restored.class_names and meta["crop_pct"] == restored.data_config["crop_pct"]
    inputs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (loaded(inputs) - restored.model(inputs)).abs().max() <= 1e-4


@pytest.mark.slow
def test_eval_command_line(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    done = transfer("eval", f"ckpt={run_dir}", "split=val", f"output={tmp_path}", "eval.tta=hflip", timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "eval_report.json").read_text())
    assert report["tta"] == "hflip" and report["split"] == "val" and "per class" in done.stdout
