"""Seeing the mistakes (misclassified.csv, top_losses.png, most confused pairs, Grad-CAM) and the hub-ready timm
export, on one real tiny run shared by the module; Grad-CAM and timm's own load run for real."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _make_image_folder, tiny_cfg, transfer, write_class_images
from PIL import Image

from transfer_cli.commands.check_inputs import CHECK_BATCHES
from transfer_cli.commands.evaluate import evaluate
from transfer_cli.commands.restore import Restored, restore
from transfer_cli.config.compose import as_schema, compose
from transfer_cli.data.images import load_rgb
from transfer_cli.data.transforms import eval_transform
from transfer_cli.errors import TransferError
from transfer_cli.models.classifier import Classifier
from transfer_cli.train import train
from transfer_cli.training.mistakes import label_errors, rank_outcomes

CLASSES = ("cat", "dog", "red", "green")
PROBE = ("trainer.max_epochs=2", "augmentation=none", "transfer=feature_extract", "optimizer.lr=0.05",
         "transfer.cache_features=false")
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """4 classes, train/val/test; two test images carry a wrong label (a red and a green image filed as cat)."""
    tmp = tmp_path_factory.mktemp("mistakes")
    root = _make_image_folder(tmp / "data", classes=CLASSES, per_class=6)
    rng = np.random.default_rng(3)
    for k, c in enumerate(CLASSES):
        write_class_images(root / "test" / c, k, 2, 32, rng)
    write_class_images(root / "test" / "cat", 2, 1, 32, rng, prefix="mislabelled_red")
    write_class_images(root / "test" / "cat", 3, 1, 32, rng, prefix="mislabelled_green")
    summary = train(tiny_cfg(tmp, root, *PROBE))
    return summary, tmp / "run", root


def forward(restored, paths):
    transform = eval_transform(restored.data_config)
    with torch.no_grad():
        return restored.model(torch.stack([transform(load_rgb(str(p))) for p in paths]))


def test_eval_lists_the_misclassified_worst_first_and_the_most_confused(tiny_run, tmp_path):
    pytest.importorskip("pytorch_grad_cam")
    _, run_dir, root = tiny_run
    report = evaluate(run_dir, output=tmp_path, top_losses=6, cam=2)
    restored = restore(run_dir)
    names = restored.class_names
    paths = sorted((root / "test").rglob("*.png"))
    logits = forward(restored, paths)
    truth = torch.tensor([names.index(p.parent.name) for p in paths])
    losses = torch.nn.functional.cross_entropy(logits, truth, reduction="none")
    predicted = logits.argmax(1)
    with open(tmp_path / "misclassified.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    wrong = {str(paths[i]) for i in range(len(paths)) if predicted[i] != truth[i]}
    assert {r["path"] for r in rows} == wrong and report["misclassified"] == len(wrong) >= 2
    assert [float(r["loss"]) for r in rows] == sorted((float(r["loss"]) for r in rows), reverse=True)
    for row in rows:
        i = paths.index(Path(row["path"]))
        assert row["true"] == names[truth[i]] and row["predicted"] == names[predicted[i]] != row["true"]
        assert float(row["loss"]) == pytest.approx(float(losses[i]), abs=1e-4)
        assert float(row["confidence"]) == pytest.approx(float(logits[i].softmax(0).max()), abs=1e-5)
    assert any("mislabelled" in r["path"] for r in rows[:2])  # a wrong label is the worst mistake of all
    matrix = np.array(report["confusion_matrix"])
    for pair in report["most_confused"]:
        i, j = names.index(pair["true"]), names.index(pair["predicted"])
        assert pair["count"] == matrix[i, j] > 0 and i != j
    assert sum(p["count"] for p in report["most_confused"]) == len(wrong)  # every off-diagonal cell (< 10 pairs)
    assert json.loads((tmp_path / "eval_report.json").read_text())["most_confused"] == report["most_confused"]
    for key in ("top_losses_png", "gradcam_png"):
        with Image.open(report[key]) as png:
            assert png.format == "PNG" and png.width > 400


def test_multilabel_misclassified_means_another_label_set():
    names = ["a", "b", "c"]
    logits = torch.tensor([[4.0, -4.0, -4.0], [4.0, 4.0, -4.0], [-4.0, -4.0, -4.0], [0.5, -0.2, 3.0]])
    targets = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 1], [1, 0, 1]])
    outcomes = rank_outcomes(logits, targets, names, "multilabel", threshold=0.5)
    wrong = {o.index: o for o in outcomes if o.wrong}
    assert set(wrong) == {1, 2}  # 1 adds b, 2 misses c; 3 is right though its a is barely over the threshold
    assert wrong[1].predicted == ["a", "b"] and wrong[2].predicted == [] and wrong[2].true == ["c"]
    assert [o.index for o in outcomes][:2] == [1, 2] or [o.index for o in outcomes][:2] == [2, 1]
    assert wrong[1].target == 1 and wrong[2].target == 2  # the label each got most wrong
    matrices = [[[2, 0], [0, 2]], [[3, 1], [0, 0]], [[2, 0], [1, 1]]]  # per label [[TN, FP], [FN, TP]]
    assert label_errors(matrices, names) == [{"label": "b", "missed": 0, "spurious": 1, "errors": 1},
                                             {"label": "c", "missed": 1, "spurious": 0, "errors": 1}]


def test_explain_writes_one_overlay_per_image_for_the_predicted_class(tiny_run, tmp_path):
    pytest.importorskip("pytorch_grad_cam")
    from transfer_cli.commands.explain import explain

    _, run_dir, root = tiny_run
    images = tmp_path / "in"
    shutil.copytree(root / "test" / "red", images)
    (images / "broken.png").write_bytes(b"not an image")
    result = explain(run_dir, images, tmp_path / "out")
    restored = restore(run_dir)
    good = sorted(images.glob("img*.png"))
    assert result.bad and result.bad[0][0] == str(images / "broken.png")
    assert result.predicted == [restored.class_names[int(i)] for i in forward(restored, good).argmax(1)]
    assert result.targets == result.predicted and len(result.files) == len(good)
    with Image.open(result.files[0]) as png:
        assert png.format == "PNG" and png.width > 300
    assert explain(run_dir, good[0], tmp_path / "dog", target="dog").targets == ["dog"]
    with pytest.raises(TransferError, match="did you mean dog"):
        explain(run_dir, good[0], tmp_path / "x", target="dgo")


def test_gradcam_without_its_package_names_the_extra(tiny_run, tmp_path, monkeypatch):
    _, run_dir, _ = tiny_run
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # as when grad-cam is not installed
    with pytest.raises(TransferError) as err:
        evaluate(run_dir, output=tmp_path, cam=2)
    assert "grad-cam package" in err.value.message and "transfer-cli[explain]" in err.value.fix
    assert not (tmp_path / "eval_report.json").exists()  # refused before any work


@pytest.mark.parametrize("members", [["test_vit"], ["test_efficientnet", "test_vit"]])
def test_gradcam_of_token_models_and_feature_combinations(members):
    pytest.importorskip("pytorch_grad_cam")
    import timm

    from transfer_cli.models.combined import CombinedBackbone
    from transfer_cli.models.gradcam import gradcam_maps

    torch.manual_seed(0)
    backbones = [timm.create_model(m, pretrained=False, num_classes=0) for m in members]
    backbone = backbones[0] if len(backbones) == 1 else CombinedBackbone(backbones, [((0.5,) * 3, (0.5,) * 3)] * 2)
    maps = gradcam_maps(Classifier(backbone, 3).eval(), torch.randn(2, 3, 160, 160), [0, 2])
    # a ViT's class token never reads the last block's output tokens: a CAM taken there would be all zero
    assert maps.shape == (2, 160, 160) and maps.max() > 0.9 and (maps > 0).mean() > 0.2


def test_export_timm_folder_loads_with_timm_and_gives_the_checkpoints_logits(tiny_run, tmp_path):
    import timm

    from transfer_cli.commands.export import export

    summary, run_dir, root = tiny_run
    result = export(run_dir, "timm", tmp_path / "hub")
    assert result.agreement.close and result.agreement.top1_same == result.agreement.samples == sum(CHECK_BATCHES)
    assert sorted(p.name for p in result.path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{result.path}", pretrained=True).eval()
    restored = restore(run_dir)
    assert model.pretrained_cfg["label_names"] == restored.class_names
    config = timm.data.resolve_data_config(model=model)  # the preprocessing travels in pretrained_cfg
    dc = restored.data_config
    assert list(config["input_size"]) == list(dc["input_size"]) and config["crop_pct"] == dc["crop_pct"]
    assert list(config["mean"]) == list(dc["mean"]) and config["interpolation"] == dc["interpolation"]
    paths = sorted((root / "test").rglob("*.png"))
    transform = timm.data.create_transform(**config)  # timm's own pipeline, not ours
    with torch.no_grad():
        got = model(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]))
    assert (got - forward(restored, paths)).abs().max() <= 1e-4
    card = (result.path / "README.md").read_text()
    assert "library_name: timm" in card and all(f". {c}" in card for c in CLASSES)
    assert f"{summary['test_acc']:.4f}" in card and "local-dir:" in card and "license: unknown" in card
    again = export(run_dir, "timm", tmp_path / "hub")  # a previous export is replaced, never merged
    assert again.path == result.path
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(TransferError, match="other files"):
        export(run_dir, "timm", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's"


def unsaved_checkpoint(tmp_path, *overrides, backbone="test_efficientnet", classes=3):
    """A real, untrained network with its config, as `restore` returns one (no training needed to export it)."""
    from transfer_cli.assembly.model import build_model

    cfg = as_schema(compose(["~experiment", "data=imagefolder", f"model.backbone={backbone}", "model.pretrained=false",
                             *overrides]))
    torch.manual_seed(0)
    model, data_config = build_model(cfg, classes)
    meta = {"class_names": [f"c{i}" for i in range(classes)], "task": "multiclass"}
    return Restored(tmp_path / "ckpt", tmp_path, cfg, meta, data_config, model.eval())


def test_export_timm_keeps_timm_kwargs_of_a_vit(tmp_path):
    import timm

    from transfer_cli.commands.hub import export_timm

    restored = unsaved_checkpoint(tmp_path, "data.image_size=32", "+model.timm_kwargs.img_size=32",
                                  backbone="test_vit")
    folder, agreement = export_timm(restored, tmp_path / "vit")
    assert agreement.close and agreement.top1_same == agreement.samples == sum(CHECK_BATCHES)
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    inputs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(inputs) - restored.model(inputs)).abs().max() <= 1e-4


@pytest.mark.parametrize("overrides,why", [(["model.head_hidden_dim=8"], "hidden layer"),
                                           (["model.feature_stages=[-1,-2]"], "feature combination")])
def test_export_timm_refuses_what_timm_cannot_hold(tmp_path, overrides, why):
    from transfer_cli.commands.hub import export_timm

    with pytest.raises(TransferError, match=why) as err:
        export_timm(unsaved_checkpoint(tmp_path, *overrides), tmp_path / "x")
    assert "format=onnx" in err.value.fix and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_push_offline_says_so_and_keeps_the_export(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    env = {"HF_HUB_OFFLINE": "1"}  # huggingface_hub's own offline switch: no request leaves
    done = transfer("push", f"ckpt={run_dir}", "repo=alice/tiny-cats", f"output={tmp_path / 'hub'}", timeout=300,
                    env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    err = " ".join(done.stderr.split())
    assert "error: cannot push to https://huggingface.co: HF_HUB_OFFLINE is set" in err and "fix:" in err
    assert "Traceback" not in done.stderr
    assert "hf-hub:alice/tiny-cats" in (tmp_path / "hub" / "README.md").read_text()
