"""Real Lightning runs of `train(cfg)` on tiny data: what trains, what stays frozen, what lands on disk."""

import csv
import json
import typing
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import tiny_cfg, write_class_images

from transfer_cli.run_files import RunLayout, RunSummary, read_summary
from transfer_cli.errors import TransferError
from transfer_cli.train import train
from transfer_cli.training.schedules import lr_factor

BACKBONE = "test_efficientnet"  # timm's tiny test model: BatchNorm everywhere, ~0.2 M parameters
TWO_EPOCHS = ("trainer.max_epochs=2",)


@pytest.fixture
def backbone_file(tmp_path):
    """A state dict for the tiny backbone (with classifier keys, as downloaded weights have)."""
    torch.manual_seed(0)
    model = timm.create_model(BACKBONE, pretrained=False, num_classes=10)
    path = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), path)
    return path, {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")}


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)  # plain data only: no pickled objects


def backbone_tensors(ckpt):
    prefix = "model.backbone."
    return {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def epoch_losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    return [float(r["train/loss_epoch"]) for r in rows]


@pytest.mark.parametrize("augmentation,cached", [("none", True), ("light", False)])
def test_feature_extract_leaves_backbone_bitwise_unchanged(tmp_path, tiny_imagefolder, backbone_file,
                                                           augmentation, cached):
    path, reference = backbone_file
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *TWO_EPOCHS, "transfer=feature_extract", f"model.weights={path}",
                   f"augmentation={augmentation}", "trainer.max_epochs=4", "optimizer.lr=0.02",
                   "transfer.head_solver=sgd")
    summary = train(cfg)
    assert summary["feature_cache"] is cached
    ckpt = load_ckpt(summary["last_checkpoint"])
    trained = backbone_tensors(ckpt)
    assert set(trained) == set(reference)
    for name, tensor in reference.items():  # weights and BatchNorm running statistics alike
        assert torch.equal(trained[name], tensor), f"frozen tensor {name} moved"
    losses = epoch_losses(tmp_path / "run")
    assert losses[-1] < losses[0], "the head did not learn"
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert {g["name"] for g in groups} == {"head/decay", "head/no_decay"}


def test_fine_tune_trains_backbone_at_scaled_lr(tmp_path, tiny_imagefolder, backbone_file):
    path, reference = backbone_file
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *TWO_EPOCHS, "transfer=fine_tune", "transfer.backbone_lr_scale=0.1",
                   f"model.weights={path}", "optimizer.lr=0.01", "scheduler=cosine", "scheduler.warmup_epochs=1",
                   "trainer.max_epochs=3")
    summary = train(cfg)
    ckpt = load_ckpt(summary["last_checkpoint"])
    trained = backbone_tensors(ckpt)
    changed = [k for k, v in reference.items() if not torch.equal(trained[k], v)]
    assert any(k.endswith("weight") and "conv" in k for k in changed), "no backbone conv weight moved"
    assert any("running_mean" in k for k in changed), "BatchNorm statistics should update when fine-tuning"

    steps, epochs = ckpt["global_step"], 3
    factor = lr_factor(steps, cfg.scheduler, steps / epochs, steps)
    groups = {g["name"]: g for g in ckpt["optimizer_states"][0]["param_groups"]}
    stages = {name.split("/")[0] for name in groups}
    assert stages == {"head", "backbone.stem", *(f"backbone.stage{i}" for i in range(1, 6))}
    for name, group in groups.items():
        scale = 0.1 if name.startswith("backbone") else 1.0
        assert group["lr"] == pytest.approx(0.01 * scale * factor, rel=1e-9, abs=1e-15)
        assert group["weight_decay"] == (0.0 if name.endswith("no_decay") else cfg.optimizer.weight_decay)


def test_run_dir_holds_readable_artifacts(tmp_path, tiny_imagefolder):
    rng = np.random.default_rng(7)
    for k, c in enumerate(("cat", "dog")):
        write_class_images(tiny_imagefolder / "test" / c, k, 3, 32, rng)
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *TWO_EPOCHS, "augmentation=none", "trainer.max_epochs=2",
                   "model.head_hidden_dim=16", "model.head_dropout=0.1")
    summary = train(cfg)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "metrics.csv").is_file()
    saved = (run / "config.yaml").read_text()
    assert "${" not in saved and str(run) in saved  # resolved
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("val_acc", "test_acc", "epochs", "best_checkpoint", "run_dir", "num_classes", "class_names"):
        assert on_disk[key] is not None, key
    assert on_disk["class_names"] == ["cat", "dog"] and on_disk["num_classes"] == 2 and on_disk["epochs"] == 2
    assert on_disk["test_size"] == 6 and 0.0 <= on_disk["test_acc"] <= 1.0
    # summary.json is what RunSummary describes: no key it lacks, each value of its declared type
    declared = typing.get_type_hints(RunSummary)
    assert set(on_disk) <= set(declared), set(on_disk) - set(declared)
    for key, value in on_disk.items():
        hint = declared[key]
        options = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
        kinds = tuple(typing.get_origin(t) or t for t in options)
        assert isinstance(value, kinds) or (float in kinds and isinstance(value, int)), (key, value, kinds)
    assert read_summary(run) == on_disk and RunLayout(run).best == Path(on_disk["best_checkpoint"])
    best = load_ckpt(run / "checkpoints" / "best.ckpt")
    head = {k: tuple(v.shape) for k, v in best["state_dict"].items() if k.startswith("model.head.")}
    width = best["transfer"]["num_features"]
    assert sorted(head.values()) == sorted([(16, width), (16,), (2, 16), (2,)])  # hidden layer, sized from data
    meta = best["transfer"]
    assert meta["class_to_idx"] == {"cat": 0, "dog": 1}
    assert meta["config"]["model"]["backbone"] == BACKBONE
    assert meta["data_config"]["input_size"] == [3, 32, 32]


@pytest.mark.parametrize("cached", [True, False])
def test_val_fraction_zero_trains_on_all_but_the_test_split(tmp_path, make_image_folder, cached):
    root = make_image_folder(tmp_path / "data", per_class=8, layout="flat")
    summary = train(tiny_cfg(tmp_path, root, *TWO_EPOCHS, "data.val_fraction=0", "data.test_fraction=0.25",
                             "callbacks.test_ckpt=last", "transfer=feature_extract", "augmentation=none",
                             "transfer.head_solver=sgd",
                             f"transfer.cache_features={str(cached).lower()}"))
    assert (summary["train_size"], summary["val_size"], summary["test_size"]) == (12, 0, 4)
    assert summary["feature_cache"] is cached
    run_dir = tmp_path / "run"
    assert not (run_dir / "checkpoints" / "best.ckpt").exists()
    assert summary["best_checkpoint"] is None and summary["val_acc"] is None
    assert summary["test_checkpoint"] == summary["last_checkpoint"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert load_ckpt(summary["last_checkpoint"])["epoch"] == 1  # both epochs trained
    assert summary["test_acc"] is not None
    with open(run_dir / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert "train/loss_epoch" in columns and not [c for c in columns if c.startswith("val/")]


def test_val_fraction_zero_refuses_what_needs_validation_before_training(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", per_class=8, layout="flat")
    cfg = tiny_cfg(tmp_path, root, *TWO_EPOCHS, "data.val_fraction=0", "callbacks.early_stopping_patience=2")
    with pytest.raises(TransferError) as err:
        train(cfg)
    assert "callbacks.test_ckpt=last" in str(err.value) and "callbacks.early_stopping_patience=0" in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()
    # a watched training metric needs no validation split
    cfg = tiny_cfg(tmp_path, root, *TWO_EPOCHS, "data.val_fraction=0", "callbacks.test_ckpt=last", "scheduler=plateau",
                   "scheduler.monitor=train/loss_epoch", "scheduler.mode=min", "trainer.max_epochs=1")
    assert train(cfg)["epochs"] == 1


def test_bad_images_within_budget_are_listed(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", bad=2)
    summary = train(tiny_cfg(tmp_path, root, *TWO_EPOCHS, "data.max_bad_images=2", "trainer.max_epochs=1"))
    assert summary["bad_images"] == 2
    listed = (tmp_path / "run" / "bad_images.txt").read_text()
    assert "corrupt000.png" in listed and "corrupt001.png" in listed


def test_bad_images_over_budget_stop_the_run(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", bad=3)
    with pytest.raises(TransferError) as err:
        train(tiny_cfg(tmp_path, root, *TWO_EPOCHS, "data.max_bad_images=1", "trainer.max_epochs=1"))
    assert "max_bad_images" in str(err.value)


def test_unknown_backbone_lists_close_matches(tmp_path, tiny_imagefolder):
    with pytest.raises(TransferError) as err:
        train(tiny_cfg(tmp_path, tiny_imagefolder, *TWO_EPOCHS, "model.backbone=resnet5O"))
    assert "resnet50" in str(err.value)


def test_a_batch_of_only_unreadable_images_is_skipped(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data")
    victim = sorted((root / "train" / "cat").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:80])  # header intact, pixels cut off: fails only when decoded
    summary = train(tiny_cfg(tmp_path, root, *TWO_EPOCHS, "data.batch_size=1", "trainer.max_epochs=1", "augmentation=light"))
    assert summary["bad_images"] == 1 and summary["epochs"] == 1
    assert victim.name in (tmp_path / "run" / "bad_images.txt").read_text()


def test_fine_tune_survives_a_last_training_batch_of_one_image(tmp_path, tiny_imagefolder):
    # 16 training images in batches of 5: the last batch would hold one image, which BatchNorm cannot train on.
    summary = train(tiny_cfg(tmp_path, tiny_imagefolder, *TWO_EPOCHS, "transfer=fine_tune", "data.batch_size=5",
                             "trainer.max_epochs=1", "augmentation=none"))
    assert summary["epochs"] == 1
    ckpt = load_ckpt(summary["last_checkpoint"])
    assert ckpt["global_step"] == 3  # 3 full batches; the single leftover image is dropped for this epoch only
