"""Calibration: the temperature and binary decision threshold fitted on val after training, stored in the
checkpoint and used by predict and eval; the ECE and threshold search against direct computations."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import _make_image_folder, tiny_cfg

from transfer_cli.commands.evaluate import evaluate
from transfer_cli.commands.predict import predict
from transfer_cli.commands.restore import restore
from transfer_cli.config.compose import as_schema, compose
from transfer_cli.data.images import load_rgb
from transfer_cli.data.transforms import eval_transform
from transfer_cli.errors import TransferError
from transfer_cli.training.calibration import choose_threshold, ece, reliability_bins
from transfer_cli.train import train

# A head trained hard on cached features (no weight decay, a large step, many epochs): its logits grow until it
# is sure of everything, including the val images whose label says otherwise.
OVERCONFIDENT = ("augmentation=none", "transfer=feature_extract", "transfer.head_solver=sgd", "optimizer.lr=0.5",
                 "optimizer.weight_decay=0", "scheduler=constant", "trainer.max_epochs=12")


def direct_ece(probs: torch.Tensor, targets: torch.Tensor, bins: int) -> float:
    """ECE written out: bin i holds confidences in [i/bins, (i+1)/bins), a confidence of 1 the last bin."""
    conf, pred = probs.max(dim=1)
    total = 0.0
    for i in range(bins):
        low, high = i / bins, (i + 1) / bins
        inside = [k for k in range(len(conf)) if low <= float(conf[k]) < high or (i == bins - 1 and conf[k] == 1)]
        if inside:
            accuracy = sum(int(pred[k] == targets[k]) for k in inside) / len(inside)
            confidence = sum(float(conf[k]) for k in inside) / len(inside)
            total += abs(accuracy - confidence) * len(inside) / len(conf)
    return total


def test_ece_and_reliability_bins_match_a_direct_computation():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 4, generator=gen) * 2.5
    targets = torch.randint(0, 4, (300,), generator=gen)
    probs = logits.softmax(-1)
    for bins in (5, 15):
        assert ece(probs, targets, bins) == pytest.approx(direct_ece(probs, targets, bins), abs=1e-5)
        got = reliability_bins(probs, targets, bins)
        assert sum(got.counts) == 300 and len(got.counts) == bins
        conf, pred = probs.max(dim=1)
        for i in range(bins):
            inside = (conf >= i / bins) & (conf < (i + 1) / bins)
            assert got.counts[i] == int(inside.sum())
            if got.counts[i]:
                assert got.accuracy[i] == pytest.approx(float((pred[inside] == targets[inside]).float().mean()))
                assert got.confidence[i] == pytest.approx(float(conf[inside].mean()), abs=1e-6)


def scores_at(p: torch.Tensor, y: torch.Tensor, t: float) -> tuple[float, float, float]:
    """(recall, balanced accuracy, F1) of p >= t, counted directly."""
    pred = p >= t
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    return tp / (tp + fn), (tp / (tp + fn) + tn / (tn + fp)) / 2, 2 * tp / (2 * tp + fp + fn)


def test_threshold_search_finds_the_best_operating_point_of_each_criterion():
    gen = torch.Generator().manual_seed(5)
    y = torch.rand(120, generator=gen) < 0.3
    p = (torch.rand(120, generator=gen) * 0.6 + y.float() * 0.35).clamp(0, 1)  # overlapping classes
    candidates = sorted(set(p.tolist()))
    for criterion, column in (("balanced_accuracy", 1), ("f1", 2)):
        best = max(scores_at(p, y, t)[column] for t in candidates)
        choice = choose_threshold(p, y, criterion)
        assert scores_at(p, y, choice.threshold)[column] == pytest.approx(best)
        assert getattr(choice, criterion) == pytest.approx(best)
    for target in (0.5, 0.8, 0.95, 1.0):
        choice = choose_threshold(p, y, "recall", target)
        assert scores_at(p, y, choice.threshold)[0] >= target
        chosen = min(t for t in candidates if t >= choice.threshold)  # the lowest score it calls positive
        higher = [t for t in candidates if t > chosen]  # any stricter operating point misses the target
        assert not higher or scores_at(p, y, min(higher))[0] < target
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold(p[y], y[y], "f1")


def val_logits(run_dir) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The best checkpoint's logits of the run's val images, computed here image by image."""
    restored = restore(run_dir)
    transform = eval_transform(restored.data_config)
    val = Path(restored.cfg.data.root) / "val"
    samples = [(p, k) for k, name in enumerate(restored.class_names) for p in sorted((val / name).glob("*.png"))]
    with torch.no_grad():
        logits = restored.model(torch.stack([transform(load_rgb(str(p))) for p, _ in samples]))
    return logits, torch.tensor([k for _, k in samples]), [str(p) for p, _ in samples]


@pytest.fixture(scope="module")
def overconfident_run(tmp_path_factory):
    """cat/dog with two cat-looking val images filed as dog: a network sure of its answers is surely wrong on
    them. The positive class (dog) gets the highest threshold with a val recall >= 0.8."""
    tmp = tmp_path_factory.mktemp("calibration")
    root = _make_image_folder(tmp / "data", per_class=12)
    for name in ("img000.png", "img001.png"):
        shutil.move(root / "val" / "cat" / name, root / "val" / "dog" / f"cat_{name}")
    summary = train(tiny_cfg(tmp, root, *OVERCONFIDENT, "calibration.threshold_criterion=recall",
                             "calibration.target_recall=0.8", "transfer.cache_dir=null"))
    return summary, tmp / "run", root


def test_the_temperature_lowers_the_val_nll_of_an_overconfident_run(overconfident_run):
    summary, run_dir, _ = overconfident_run
    calibration = summary["calibration"]
    assert calibration["checkpoint"] == "best.ckpt" and "last.ckpt" in calibration["other_checkpoints"]
    temperature = calibration["temperature"]
    assert temperature > 1  # sure and sometimes wrong: the fit softens it
    logits, targets, _ = val_logits(run_dir)
    before, after = F.cross_entropy(logits, targets), F.cross_entropy(logits / temperature, targets)
    assert float(after) < float(before)
    assert calibration["nll_val_before"] == pytest.approx(float(before), rel=1e-4)
    assert calibration["nll_val_after"] == pytest.approx(float(after), rel=1e-4)
    for t in (temperature * 0.8, temperature * 1.25):  # a minimum, not just an improvement
        assert float(F.cross_entropy(logits / t, targets)) > float(after)
    assert calibration["ece_val_before"] == pytest.approx(direct_ece(logits.softmax(-1), targets, 15), abs=1e-5)
    assert calibration["ece_val_after"] == pytest.approx(
        direct_ece((logits / temperature).softmax(-1), targets, 15), abs=1e-5)
    on_disk = json.loads((run_dir / "summary.json").read_text())["calibration"]
    assert on_disk["temperature"] == temperature and on_disk["criterion"] == "recall"


def test_checkpoints_hold_their_own_calibration_as_plain_data(overconfident_run):
    summary, run_dir, _ = overconfident_run
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)
        block = ckpt["transfer"]["calibration"]
        expected = summary["calibration"] if name == "best.ckpt" else summary["calibration"]["other_checkpoints"][name]
        assert block["temperature"] == expected["temperature"] and block["threshold"] == expected["threshold"]
        assert block["fitted_on"] == "val" and block["positive_class"] == "dog"


def test_the_decision_threshold_meets_the_target_recall_on_val_and_predict_uses_it(overconfident_run, tmp_path):
    summary, run_dir, root = overconfident_run
    calibration = summary["calibration"]
    threshold, temperature = calibration["threshold"], calibration["temperature"]
    logits, targets, paths = val_logits(run_dir)
    dog = (logits / temperature).softmax(-1)[:, 1]
    positive = targets == 1
    assert float(((dog >= threshold) & positive).sum() / positive.sum()) >= 0.8
    assert calibration["val_at_threshold"]["recall"] >= 0.8
    predict(run_dir, root / "val", tmp_path / "p.csv")
    with open(tmp_path / "p.csv", newline="") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    for path, p in zip(paths, dog):
        row = rows[path]
        assert row["decision"] == f"dog if p>={threshold:.6f}"
        assert row["label"] == ("dog" if float(p) >= threshold else "cat")
    predicted_dog = torch.tensor([rows[p]["label"] == "dog" for p in paths])
    assert float((predicted_dog & positive).sum() / positive.sum()) >= 0.8


def test_eval_reports_ece_before_and_after_and_draws_the_reliability_diagram(overconfident_run, tmp_path):
    summary, run_dir, _ = overconfident_run
    report = evaluate(run_dir, split="val", output=tmp_path / "ev")
    section = report["calibration"]
    assert section["stored"] and section["temperature"] == summary["calibration"]["temperature"]
    assert section["ece_before"] == pytest.approx(summary["calibration"]["ece_val_before"], abs=1e-5)
    assert section["ece_after"] == pytest.approx(summary["calibration"]["ece_val_after"], abs=1e-5)
    assert section["at_threshold"]["recall"] == pytest.approx(summary["calibration"]["val_at_threshold"]["recall"])
    from PIL import Image

    with Image.open(tmp_path / "ev" / "reliability.png") as img:
        assert img.format == "PNG"


def test_without_a_val_split_calibration_is_skipped_with_a_log_line(tmp_path, caplog):
    root = _make_image_folder(tmp_path / "data", per_class=6, layout="flat")
    with caplog.at_level(logging.INFO, logger="transfer_cli"):
        summary = train(tiny_cfg(tmp_path, root, *OVERCONFIDENT, "trainer.max_epochs=1", "data.val_fraction=0",
                                 "callbacks.test_ckpt=last"))
    assert summary["calibration"]["skipped"].startswith("no validation split")
    assert any("calibration skipped: no validation split" in r.getMessage() for r in caplog.records)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert "calibration" not in ckpt["transfer"]


def test_a_threshold_the_data_cannot_take_fails_before_training(tmp_path):
    root = _make_image_folder(tmp_path / "data", classes=("cat", "dog", "red"), per_class=4)
    with pytest.raises(TransferError, match="two-class task, but the data has 3 classes"):
        train(tiny_cfg(tmp_path, root, "calibration.threshold_criterion=f1", run="a"))
    two = _make_image_folder(tmp_path / "two", per_class=4)
    with pytest.raises(TransferError, match="positive_class=zebra is not a class"):
        train(tiny_cfg(tmp_path, two, "calibration.threshold_criterion=f1", "calibration.positive_class=zebra", run="b"))
    with pytest.raises(TransferError, match="one of: none, balanced_accuracy, f1, recall"):
        compose(["calibration.threshold_criterion=f1_score"])
    with pytest.raises(TransferError, match="calibration.target_recall"):
        as_schema(compose(["calibration.target_recall=1.5"]))


def test_resuming_a_finished_run_with_another_criterion_refits_only_the_calibration(tmp_path):
    from transfer_cli.resume.plan import plan_resume

    root = _make_image_folder(tmp_path / "data", per_class=6)
    first = train(tiny_cfg(tmp_path, root, *OVERCONFIDENT, "trainer.max_epochs=2"))
    assert first["calibration"]["criterion"] == "none" and first["calibration"]["threshold"] is None
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = torch.load(last, map_location="cpu", weights_only=True)
    again = train(plan_resume(str(tmp_path / "run"), ["calibration.threshold_criterion=balanced_accuracy"]).config)
    after = torch.load(last, map_location="cpu", weights_only=True)
    assert again["epochs"] == first["epochs"] and after["global_step"] == before["global_step"]
    assert all(torch.equal(before["state_dict"][k], v) for k, v in after["state_dict"].items())
    block = after["transfer"]["calibration"]
    assert block["criterion"] == "balanced_accuracy" and block["threshold"] is not None
    assert block["temperature"] == before["transfer"]["calibration"]["temperature"]  # the same weights, the same T


def test_predict_takes_calibrated_true_or_false_only():
    from transfer_cli.commands.predict import OPTIONS, OVERRIDES
    from transfer_cli.config.args import parse_command_args

    values, _ = parse_command_args("predict", ["ckpt=x", "input=y", "calibrated=false"], OPTIONS, OVERRIDES)
    assert values["calibrated"] is False
    with pytest.raises(TransferError, match="calibrated"):
        parse_command_args("predict", ["ckpt=x", "input=y", "calibrated=maybe"], OPTIONS, OVERRIDES)
