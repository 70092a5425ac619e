"""The converged probe inside real runs: transfer.head_solver (a solved head leaves a normal run dir that eval,
predict, export and resume use unchanged) and transfer.head_init=probe (fine-tuning starts from the probe)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import tiny_cfg, write_class_images
from PIL import Image

from transfer_cli.assembly.run import build_run
from transfer_cli.commands.evaluate import evaluate
from transfer_cli.commands.export import export
from transfer_cli.commands.predict import predict
from transfer_cli.config.compose import as_schema
from transfer_cli.errors import TransferError
from transfer_cli.resume.plan import plan_resume
from transfer_cli.train import train
from transfer_cli.training.probe import fit_probe

CLASSES = ("cat", "dog", "red")
FROZEN = ("transfer=feature_extract", "augmentation=none")  # cached features: transfer.head_solver=auto solves
HEAD = "model.head.layers.0."


def head(ckpt_path):
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    return state[HEAD + "weight"], state[HEAD + "bias"]


@pytest.fixture(scope="module")
def solved_run(tmp_path_factory):
    """A solved-head run on 3 classes with train/val/test folders, 32 px; shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("solved")
    from conftest import _make_image_folder

    root = _make_image_folder(tmp / "data", classes=CLASSES, per_class=8)
    rng = np.random.default_rng(3)
    for k, c in enumerate(CLASSES):
        write_class_images(root / "test" / c, k, 3, 32, rng)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFER_CACHE_DIR", str(tmp / "feature-cache"))
        cfg = tiny_cfg(tmp, root, *FROZEN, "trainer.max_epochs=30")
        run = build_run(cfg, tmp / "run")
        summary = train(cfg)
    return summary, tmp / "run", root, run


def test_solved_head_leaves_a_normal_run_dir(solved_run):
    summary, run_dir, _, _ = solved_run
    for name in ("config.yaml", "metrics.csv", "summary.json", "audit.json", "probe_curve.png",
                 "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    assert summary["epochs"] == 1  # one pass, whatever trainer.max_epochs says (it belongs to the sgd solver)
    probe = summary["probe"]
    assert probe["use"] == "solved head" and probe["solver"] == "lbfgs" and probe["chosen_on"] == "val"
    assert probe["fit_seconds"] > 0 and probe["strength"] in [g["strength"] for g in probe["grid"]]
    assert summary["val_acc"] == pytest.approx(probe["val_score"], abs=1e-6)  # the strength chosen on val
    assert summary["test_size"] == 9 and summary["test_acc"] is not None
    assert json.loads((run_dir / "summary.json").read_text())["probe"]["strength"] == probe["strength"]
    with Image.open(run_dir / "probe_curve.png") as img:
        assert img.format == "PNG"
    metrics = (run_dir / "metrics.csv").read_text()
    assert "val/acc" in metrics and "train/acc" in metrics and "test/acc" in metrics


def test_the_checkpoint_holds_the_converged_probe(solved_run):
    """The head in best.ckpt and last.ckpt is fit_probe's solution on the run's cached features."""
    summary, run_dir, _, run = solved_run
    run.datamodule.setup("fit")  # reads the features the run stored
    tensors = run.features.tensors
    expected = fit_probe(*tensors["train"].tensors, *tensors["val"].tensors, num_classes=len(CLASSES))
    assert expected.strength == pytest.approx(summary["probe"]["strength"])
    for name in ("best.ckpt", "last.ckpt"):
        weight, bias = head(run_dir / "checkpoints" / name)
        assert torch.allclose(weight, expected.linear.weight, atol=1e-4)
        assert torch.allclose(bias, expected.linear.bias, atol=1e-4)


def test_eval_predict_export_and_resume_work_on_a_solved_run(solved_run, tmp_path):
    summary, run_dir, root, _ = solved_run
    report = evaluate(run_dir, output=tmp_path / "eval")
    assert report["metrics"]["acc"] == pytest.approx(summary["test_acc"], abs=1e-6)
    predicted = predict(run_dir, root / "test", tmp_path / "predictions.csv", topk=2)
    assert not predicted.bad and (tmp_path / "predictions.csv").is_file()
    assert export(run_dir, "torchscript", tmp_path / "model.pt").max_abs_diff <= 1e-4
    before = head(run_dir / "checkpoints" / "last.ckpt")
    resumed = train(plan_resume(str(run_dir), []).config)  # a finished solve: nothing left to do
    assert resumed["epochs"] == 1 and "probe" not in resumed  # the checkpoint holds the head; no refit
    after = head(run_dir / "checkpoints" / "last.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("extra, reason", [
    ("model.head_hidden_dim=8", "hidden layer"),
    ("model.head_dropout=0.1", "dropout"),
    ("augmentation.label_smoothing=0.1", "label_smoothing"),
    ("transfer.cache_features=false", "cached features"),
])
def test_auto_trains_by_steps_what_the_probe_cannot_solve_and_lbfgs_says_why(tmp_path, tiny_imagefolder, extra,
                                                                              reason):
    run = build_run(tiny_cfg(tmp_path, tiny_imagefolder, *FROZEN, extra), tmp_path / "auto")
    assert not run.solved and run.probe is None
    with pytest.raises(TransferError) as err:
        build_run(tiny_cfg(tmp_path, tiny_imagefolder, *FROZEN, extra, "transfer.head_solver=lbfgs"), tmp_path / "x")
    assert reason in err.value.message and "transfer.head_solver=sgd" in err.value.fix


def test_without_a_validation_split_the_strength_is_chosen_on_a_holdout_of_train(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", per_class=10, layout="flat")
    summary = train(tiny_cfg(tmp_path, root, *FROZEN, "data.val_fraction=0", "data.test_fraction=0.2",
                             "callbacks.test_ckpt=last"))
    assert summary["val_size"] == 0 and summary["test_acc"] is not None
    assert summary["probe"]["chosen_on"].startswith("a 20% holdout of train")
    assert summary["test_checkpoint"] == summary["last_checkpoint"]


def test_multilabel_head_is_solved_with_one_sigmoid_per_label(tmp_path):
    from transfer_cli.config.compose import compose

    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for i in range(32):  # the label set {a, b} from the image's look: dark none, bright a, red b, green both
        k = i % 4
        write_class_images(tmp_path / "img", k, 1, 32, rng, prefix=f"x{i:02d}_")
        rows.append(f"img/x{i:02d}_000.png,{';'.join(n for n, on in (('a', k & 1), ('b', k & 2)) if on)}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    summary = train(compose([
        "experiment=multilabel_csv", f"data.csv={tmp_path / 'labels.csv'}", "model.backbone=test_efficientnet",
        "model.weights=null", "model.pretrained=false", "data.image_size=32", "data.num_workers=0", "trainer=cpu",
        *FROZEN, "augmentation.label_smoothing=0", "callbacks.rich_progress=false",
        "trainer.enable_progress_bar=false", f"paths.output_dir={tmp_path / 'run'}"]))
    assert summary["task"] == "multilabel" and summary["epochs"] == 1
    assert summary["probe"]["metric"] == "mAP" and 0 < summary["val_mAP"] <= 1
    assert summary["val_mAP"] == pytest.approx(summary["probe"]["val_score"], abs=1e-5)


def test_lr_find_refuses_a_solved_head(tmp_path, tiny_imagefolder):
    from transfer_cli.commands.lr_find import FinderOptions, find_lr

    with pytest.raises(TransferError) as err:
        find_lr(tiny_cfg(tmp_path, tiny_imagefolder, *FROZEN), tmp_path / "lr", FinderOptions())
    assert "transfer.head_solver=sgd" in err.value.fix


class HeadAtStart(pl.Callback):
    """The head's weights when the first optimizer step is about to happen."""

    def on_train_start(self, trainer, pl_module):
        self.weights = [t.detach().clone() for t in pl_module.model.head.parameters()]


@pytest.mark.parametrize("mode", ["fine_tune", "partial", "gradual_unfreeze"])
def test_head_init_probe_starts_fine_tuning_from_the_probe(tmp_path, tiny_imagefolder, mode):
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, f"transfer={mode}", "transfer.head_init=probe",
                   "transfer.freeze_stages=1", "trainer.max_epochs=1", "model.head_dropout=0.1")
    run = build_run(cfg, tmp_path / "run")
    start = HeadAtStart()
    run.trainer.callbacks.append(start)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    probe = run.probe.result
    assert probe is not None and probe.metric == "accuracy"
    linear = [m for m in run.model.head.modules() if isinstance(m, torch.nn.Linear)][0]
    assert torch.allclose(start.weights[0], probe.linear.weight) and torch.allclose(start.weights[1], probe.linear.bias)
    assert not torch.allclose(linear.weight.detach(), probe.linear.weight)  # then fine-tuning moved it


def test_head_init_probe_needs_a_linear_head(tmp_path, tiny_imagefolder):
    with pytest.raises(TransferError) as err:
        build_run(tiny_cfg(tmp_path, tiny_imagefolder, "transfer=fine_tune", "transfer.head_init=probe",
                           "model.head_hidden_dim=8"), tmp_path / "run")
    assert "model.head_hidden_dim=0" in err.value.fix


def test_a_resumed_lp_ft_run_does_not_refit_the_probe(tmp_path, tiny_imagefolder):
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, "transfer=fine_tune", "transfer.head_init=probe",
                   "trainer.max_epochs=1")
    first = train(cfg)
    assert first["probe"]["use"] == "initial head"
    resumed = as_schema(plan_resume(str(tmp_path / "run"), ["trainer.max_epochs=2"]).config)
    summary = train(resumed)
    assert summary["epochs"] == 2 and "probe" not in summary
