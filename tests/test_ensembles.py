"""Ensembles (eval / predict / export of several checkpoints), weight soups, and callbacks.swa, on real tiny runs."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import _make_image_folder, tiny_cfg, write_class_images
from test_bad_inputs import cli, refused

from transfer_cli.commands.evaluate import evaluate
from transfer_cli.commands.export import export
from transfer_cli.commands.predict import predict
from transfer_cli.commands.restore import restore
from transfer_cli.commands.soup import soup
from transfer_cli.config.compose import as_schema, compose
from transfer_cli.errors import TransferError
from transfer_cli.resume.plan import plan_resume
from transfer_cli.train import train

CLASSES = ("cat", "dog", "red")
PROBE = ("trainer.max_epochs=2", "augmentation=none", "transfer=feature_extract", "optimizer.lr=0.05",
         "transfer.cache_features=false")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A and B: other seeds and image sizes (an ensemble that preprocesses per member); C: A's start and seed with
    another LR (soup ingredients of A's)."""
    tmp = tmp_path_factory.mktemp("ensembles")
    root = _make_image_folder(tmp / "data", classes=CLASSES, per_class=4)
    rng = np.random.default_rng(7)
    for k, c in enumerate(CLASSES):
        write_class_images(root / "test" / c, k, 2, 32, rng)
    for name, extra in (("A", ["seed=0"]), ("B", ["seed=1", "data.image_size=40"]),
                        ("C", ["seed=0", "optimizer.lr=0.01"])):
        train(tiny_cfg(tmp, root, *PROBE, *extra, run=name))
    return {name: tmp / name for name in "ABC"} | {"root": root}


def probabilities(path):
    """{image path: [p(class) for CLASSES]} of a predictions.csv written with topk=len(CLASSES)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["path"]: [float(next(r[f"top{k}_prob"] for k in range(1, 4) if r[f"top{k}_label"] == c))
                        for c in CLASSES] for r in rows}


def test_ensemble_predict_and_eval_average_the_members_probabilities(runs, tmp_path):
    test = runs["root"] / "test"
    one = {m: probabilities(predict(runs[m], test, tmp_path / f"{m}.csv", topk=3).output) for m in "AB"}
    both = probabilities(predict([str(runs["A"]), str(runs["B"])], test, tmp_path / "AB.csv", topk=3).output)
    assert set(both) == set(one["A"])
    for path, p in both.items():  # each member calibrated at its own temperature, with its own image size
        assert p == pytest.approx([(a + b) / 2 for a, b in zip(one["A"][path], one["B"][path])], abs=2e-6)

    report = evaluate([str(runs["A"]), str(runs["B"])], split="test", output=tmp_path / "eval")
    truth = [CLASSES.index(os.path.basename(os.path.dirname(p))) for p in both]
    mean_acc = np.mean([int(np.argmax(p)) == t for p, t in zip(both.values(), truth)])
    assert report["metrics"]["acc"] == pytest.approx(mean_acc, abs=1e-6)
    members = json.loads((tmp_path / "eval" / "eval_report.json").read_text())["ensemble"]["members"]
    assert [m["input_size"] for m in members] == [[3, 32, 32], [3, 40, 40]]
    assert members[0]["metrics"] == evaluate(runs["A"], split="test", output=tmp_path / "a")["metrics"]

    folder = tmp_path / "kfold"  # as k-fold training leaves it: ensemble.json beside the members
    folder.mkdir()
    spec = {"members": [os.path.relpath(runs[m], folder) for m in "AB"], "weights": [3, 1]}
    (folder / "ensemble.json").write_text(json.dumps(spec))
    weighed = probabilities(predict(folder, test, tmp_path / "weighed.csv", topk=3).output)
    for path, p in weighed.items():
        assert p == pytest.approx([0.75 * a + 0.25 * b for a, b in zip(one["A"][path], one["B"][path])], abs=2e-6)


def test_members_with_other_classes_or_starts_are_refused(runs, tmp_path):
    ckpt = torch.load(runs["B"] / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    ckpt["transfer"]["class_names"] = ["cat", "red", "dog"]
    torch.save(ckpt, tmp_path / "other.ckpt")
    out = cli("eval", f"ckpt=[{runs['A']},{tmp_path / 'other.ckpt'}]", f"output={tmp_path / 'out'}", cwd=tmp_path)
    assert "disagree on the classes" in refused(out, "fix:")
    assert not (tmp_path / "out").exists()
    with pytest.raises(TransferError, match="preprocessing"):  # B: another image size, another seed
        soup([str(runs["A"]), str(runs["B"])], output=tmp_path / "soup")
    with pytest.raises(TransferError, match="format=timm holds one timm model"):
        export([str(runs["A"]), str(runs["C"])], format="timm")


def test_uniform_soup_of_one_checkpoint_twice_is_that_checkpoint(runs, tmp_path):
    record = soup([str(runs["A"]), str(runs["A"])], output=tmp_path / "soup")
    original = torch.load(runs["A"] / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    souped = torch.load(record["checkpoint"], weights_only=True)
    assert set(souped["state_dict"]) == set(original)
    assert all(torch.equal(souped["state_dict"][k], original[k]) for k in original)
    assert restore(tmp_path / "soup").class_names == list(CLASSES)  # a checkpoint eval, predict and export take
    with pytest.raises(TransferError, match="weight soup"):
        plan_resume(str(tmp_path / "soup"), [])


def test_greedy_soup_is_never_worse_on_val_than_its_best_member(runs, tmp_path):
    record = soup([str(runs["C"]), str(runs["A"])], method="greedy", output=tmp_path / "greedy")
    assert record["metric"] == "val/acc" and record["chosen"][0] in record["member_val"]
    best = max(record["member_val"].values())
    assert record["val"]["val/acc"] >= best
    assert record["member_val"][record["chosen"][0]] == best  # the best member comes first
    scored = evaluate(tmp_path / "greedy", split="val", output=tmp_path / "eval")
    assert scored["metrics"]["acc"] == pytest.approx(record["val"]["val/acc"], abs=1e-6)

    uniform = soup([str(runs["A"]), str(runs["C"])], output=tmp_path / "uniform")
    a, c = (torch.load(runs[m] / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"] for m in "AC")
    mean = torch.load(uniform["checkpoint"], weights_only=True)["state_dict"]
    assert all(torch.allclose(mean[k], (a[k].double() + c[k].double()).div(2).to(a[k].dtype)) for k in a
               if a[k].is_floating_point())


def test_ensemble_onnx_export_outputs_the_mean_of_the_members_probabilities(runs, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    from transfer_cli.commands.check_inputs import sample_inputs

    members = [str(runs["A"]), str(runs["C"])]
    result = export(members, format="onnx", output=tmp_path / "ensemble.onnx")
    assert result.agreement.close and result.metadata["output_name"] == "probabilities"
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    images = sample_inputs(result.metadata, 5, seed=3)
    got = session.run(None, {"images": images.numpy()})[0]
    expected = 0
    for m in members:
        restored = restore(m)
        with torch.no_grad():
            expected = expected + 0.5 * (restored.model(images) / restored.meta["calibration"]["temperature"]).softmax(-1)
    assert np.abs(got - expected.numpy()).max() < 1e-5
    test = runs["root"] / "test"
    onnx = probabilities(predict(result.path, test, tmp_path / "onnx.csv", topk=3).output)
    torch_rows = probabilities(predict(members, test, tmp_path / "torch.csv", topk=3).output)
    assert all(onnx[p] == pytest.approx(torch_rows[p], abs=1e-5) for p in torch_rows)
    with pytest.raises(TransferError, match="preprocess differently"):  # B reads 40 px images, A 32 px
        export([str(runs["A"]), str(runs["B"])], format="onnx", output=tmp_path / "no.onnx")


class EpochEndWeights(pl.Callback):
    """The raw weights at each training epoch's end (validation has swapped the average out again by then)."""

    def __init__(self):
        self.weights = []

    def on_train_epoch_end(self, trainer, module):
        self.weights.append({k: v.detach().clone() for k, v in module.state_dict().items()})


def test_swa_validates_and_saves_the_mean_of_the_epoch_end_weights(tmp_path, tiny_imagefolder):
    seen = EpochEndWeights()
    summary = train(tiny_cfg(tmp_path, tiny_imagefolder, "transfer=feature_extract", "transfer.head_solver=sgd",
                             "augmentation=none", "scheduler=constant", "trainer.max_epochs=3", "callbacks.swa=true",
                             "callbacks.swa_start=0.5"), callbacks=[seen])  # averages the ends of epochs 1 and 2
    last = torch.load(summary["last_checkpoint"], weights_only=True)
    raw1, raw2 = seen.weights[1], seen.weights[2]
    assert all(torch.equal(last["current_model_state"][k], raw2[k]) for k in raw2)
    head = [k for k in raw2 if k.startswith("model.head.")]
    assert any(not torch.equal(raw1[k], raw2[k]) for k in head)
    for k, v in last["state_dict"].items():
        if v.is_floating_point():
            assert torch.allclose(v, (raw1[k] + raw2[k]) / 2, atol=1e-7), k
    with pytest.raises(TransferError, match="callbacks.swa=true"):  # Lightning's own callback is refused
        as_schema(compose(["+callbacks.extra.s._target_=pytorch_lightning.callbacks.StochasticWeightAveraging"]))
