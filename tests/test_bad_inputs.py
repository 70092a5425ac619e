"""Bad inputs and faults as a hostile but realistic user makes them, through the real CLI: each gets one `error:`
line and one `fix:` line and exit 2 (or the signal's code), no traceback, and nothing outside the run's own dir
changes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import _make_image_folder, tiny_run_overrides, transfer, write_class_images

from transfer_cli.errors import from_os_error
from transfer_cli.run_dir import fresh_dir

cli = transfer  # conftest: the CLI in a subprocess


def tree_hash(root: Path) -> str:
    """Every file under `root` (path and bytes): equal before and after means nothing there changed."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def refused(out, *in_message):
    """Exit 2 with one error: and one fix: line, no traceback; returns the error text."""
    text = out.stderr + out.stdout
    assert out.returncode == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    fixes = [line for line in out.stderr.splitlines() if line.startswith("fix:")]
    assert len(errors) == 1 and len(fixes) == 1, out.stderr[-3000:]
    message = " ".join(out.stderr.split())
    for part in in_message:
        assert part in message, message
    return message


def train_args(root, *extra):
    return ["train", *tiny_run_overrides(root, None, "trainer.max_epochs=1", *extra)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _make_image_folder(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """A finished run of the real CLI, shared by the tests that point commands at it (they never change it)."""
    base = tmp_path_factory.mktemp("finished")
    out = cli(*train_args(data, "transfer=fine_tune"), f"hydra.run.dir={base / 'run'}", cwd=base)
    assert out.returncode == 0, out.stderr[-3000:]
    return base / "run"


# ---------------------------------------------------------------- values, before torch loads


@pytest.mark.parametrize("override,in_message", [
    ("optimizer.lr=-1", "optimizer.lr=-1"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("data.image_size=0", "data.image_size=0"),
    ("data.std=[0,0,0]", "data.std[0]=0"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5"),  # a pre-split folder: still checked
    ("data.val_fraction=-0.2", "data.val_fraction=-0.2 is out of range"),
    ("optimizer.lr=abc", "optimizer.lr"),
    ("callbacks.monitor=val/accuracy", "did you mean val/acc"),
    ("trainer.precision=bf16-mix", "did you mean bf16-mixed"),
])
def test_a_bad_value_is_refused_before_torch_loads(tmp_path, data, override, in_message):
    before = tree_hash(data)
    out = cli(*train_args(data, override), cwd=tmp_path, probe=True)
    refused(out, in_message)
    assert "HEAVY []" in out.stderr  # checked with the schema, before torch, Lightning and timm
    assert not (tmp_path / "outputs").exists()  # and before a run dir is made
    assert tree_hash(data) == before


@pytest.mark.parametrize("command,argument,in_message", [
    ("data-report", "hydra.run.dir=elsewhere", ["keys that choose what it reads", "output=<folder>"]),
    ("data-report", "optimizer.lr=0.1", ["keys that choose what it reads"]),
    ("eval", "optimizer.lr=0.1", ["comes from the checkpoint"]),
])
def test_an_argument_a_command_does_not_take_is_explained_in_that_commands_terms(tmp_path, data, command,
                                                                                 argument, in_message):
    args = [f"data.root={data}", "data=imagefolder"] if command == "data-report" else [f"ckpt={tmp_path}"]
    message = refused(cli(command, *args, argument, cwd=tmp_path, probe=True), *in_message)
    if command == "data-report":
        assert "checkpoint" not in message  # it has none


def test_a_run_dir_that_is_a_file_is_refused(tmp_path, data):
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    refused(cli(*train_args(data), f"hydra.run.dir={afile}", cwd=tmp_path), "is an existing file")
    assert afile.read_text() == "keep me"


def test_home_in_a_path_value_is_expanded(tmp_path, data):
    home = tmp_path / "home"
    shutil.copytree(data, home / "flowers")
    out = cli(*train_args("~/flowers"), "--cfg", "job", cwd=tmp_path, env={"HOME": str(home)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"root: {home / 'flowers'}" in out.stdout


def test_a_user_os_error_becomes_an_error_with_its_fix():
    full = from_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/run/last.ckpt"))
    assert full is not None and "/data/run/last.ckpt" in full.message and "disk space" in full.fix
    assert from_os_error(OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/run")).fix.startswith("choose a")
    assert from_os_error(OSError(errno.EBADF, "bad file descriptor")) is None  # a bug: keeps its traceback


# ---------------------------------------------------------------- run dirs


def test_a_second_run_in_a_live_runs_dir_is_refused_and_changes_nothing(tmp_path, data):
    run = tmp_path / "shared"
    first = subprocess.Popen([sys.executable, "-m", "transfer_cli", *train_args(data, "trainer.max_epochs=4",
                              "seed=1"), f"hydra.run.dir={run}"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run / "config.yaml").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)  # the first run holds the dir and has started training
    assert (run / ".transfer.lock").exists()
    hydra_record = (run / ".hydra" / "overrides.yaml").read_text()
    second = cli(*train_args(data, "seed=2", "model.backbone=test_resnet"), f"hydra.run.dir={run}", cwd=tmp_path)
    refused(second, "in use by another run", "PID")
    assert first.wait(timeout=600) == 0, first.communicate()[0][-3000:]
    assert (run / ".hydra" / "overrides.yaml").read_text() == hydra_record  # the second run wrote nothing there
    assert json.loads((run / "summary.json").read_text())["epochs"] == 4
    assert "test_resnet" not in (run / "config.yaml").read_text()
    assert not (run / ".transfer.lock").exists()  # released at exit


def test_a_finished_runs_dir_is_refused_unless_resumed(tmp_path, data, finished):
    before = tree_hash(finished)
    message = refused(cli(*train_args(data), f"hydra.run.dir={finished}", cwd=tmp_path), "holds a finished run")
    assert f"transfer train resume={finished}" in message
    assert tree_hash(finished) == before


def test_default_run_dirs_are_fresh_even_within_one_second(tmp_path):
    name = str(tmp_path / "outputs" / "demo" / "2026-11-30_10-00-00")
    Path(name).mkdir(parents=True)  # another run took this second's name
    claimed = fresh_dir(name)
    assert claimed == name + "_2" and Path(claimed).is_dir()
    assert fresh_dir(name) == claimed  # the same process asking again (Hydra resolves the name more than once)


# ---------------------------------------------------------------- data


def test_symlinks_never_list_a_file_twice_or_leave_the_class_folder(tmp_path, caplog):
    from transfer_cli.data.imagefolder import from_imagefolder

    root = _make_image_folder(tmp_path / "d")
    os.symlink(root / "train" / "cat", root / "train" / "cat" / "loop")
    os.symlink(root / "train", root / "train" / "cat" / "up")
    write_class_images(root / "train" / "dog", 1, 1, 16, __import__("numpy").random.default_rng(0), prefix="g")
    (root / "train" / "dog" / "g000.png").rename(root / "train" / "dog" / "g000.gif")  # PIL reads it by content
    splits = from_imagefolder(str(root), 0.2, 0.0, 0)
    assert splits.counts("train") == [8, 9]  # 8 cats once each; 8 dogs and the .gif
    assert "loop" in caplog.text and "outside" in caplog.text

    os.symlink(root / "train" / "cat" / "img000.png", root / "train" / "dog" / "stolen.png")
    with pytest.raises(Exception, match="in two class folders"):
        from_imagefolder(str(root), 0.2, 0.0, 0)


@pytest.mark.parametrize("rows,in_message", [
    (["a/img000.png,cat,train", "a/img001.png,cat,train", "b/img000.png,dog,train", "b/img001.png,dog,train",
      "a/img000.png,cat,val", "b/img002.png,dog,val"], "in two splits (train, val)"),
    (["a/img000.png,cat,train", "a/img000.png,dog,train", "b/img000.png,dog,train", "b/img001.png,dog,val",
      "a/img001.png,cat,val"], "with different labels (cat, dog)"),
])
def test_a_csv_that_repeats_an_image_is_refused_naming_the_lines(tmp_path, rows, in_message):
    import numpy as np

    rng = np.random.default_rng(0)
    write_class_images(tmp_path / "a", 0, 3, 16, rng)
    write_class_images(tmp_path / "b", 1, 3, 16, rng)
    (tmp_path / "labels.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    args = ["train", *tiny_run_overrides(tmp_path, None, "trainer.max_epochs=1")]
    args = [a for a in args if not a.startswith(("data=", "data.root="))] + ["data=csv", f"data.csv={tmp_path}/labels.csv"]
    refused(cli(*args, cwd=tmp_path), in_message, "lines 2, 6" if "splits" in in_message else "lines 2, 3")


# ---------------------------------------------------------------- a run that diverges


def test_a_diverging_run_stops_and_writes_no_non_finite_checkpoint(tmp_path, data):
    run = tmp_path / "run"
    out = cli(*train_args(data, "transfer=fine_tune", "optimizer=sgd", "optimizer.lr=1e6", "trainer.max_epochs=2"),
              f"hydra.run.dir={run}", cwd=tmp_path)
    refused(out, "NaN or infinite at optimizer step", "optimizer.lr", "trainer.gradient_clip_val")
    for ckpt in run.glob("checkpoints/*.ckpt"):  # whatever was saved before it diverged is finite
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_commands_refuse_a_checkpoint_with_non_finite_weights(tmp_path, data, finished):
    ckpt = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)
    name = next(k for k in ckpt["state_dict"] if k.startswith("model.head"))
    ckpt["state_dict"][name] = torch.full_like(ckpt["state_dict"][name], float("nan"))
    bad = tmp_path / "nan.ckpt"
    torch.save(ckpt, bad)
    refused(cli("predict", f"ckpt={bad}", f"input={data / 'val'}", f"output={tmp_path / 'p.csv'}", cwd=tmp_path),
            "NaN or infinite weights", name)
    assert not (tmp_path / "p.csv").exists()
    refused(cli("eval", f"ckpt={bad}", cwd=tmp_path), "NaN or infinite weights")


# ---------------------------------------------------------------- outputs


def test_predict_never_writes_over_an_input_and_a_folder_means_predictions_csv(tmp_path, data, finished):
    listing = tmp_path / "in.csv"
    listing.write_text("path,note\n" + "".join(f"{p},keep\n" for p in sorted((data / "val").rglob("*.png"))))
    before = listing.read_bytes()
    refused(cli("predict", f"ckpt={finished}", f"input={listing}", f"output={listing}", cwd=tmp_path),
            "is one of this command's inputs")
    assert listing.read_bytes() == before
    folder = tmp_path / "preds"
    folder.mkdir()
    out = cli("predict", f"ckpt={finished}", f"input={listing}", f"output={folder}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (folder / "predictions.csv").read_text().startswith("path,label,probability")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not an image")
    refused(cli("predict", f"ckpt={finished}", f"input={broken}", f"output={tmp_path / 'b.csv'}", cwd=tmp_path),
            "none of the 1 image(s) could be read")


def test_commands_never_write_into_a_run_or_over_a_checkpoint(tmp_path, finished):
    before = tree_hash(finished)
    refused(cli("export", f"ckpt={finished}", "format=torchscript", f"output={finished / 'checkpoints' / 'best.ckpt'}",
                cwd=tmp_path), "checkpoints")
    refused(cli("eval", f"ckpt={finished}", f"output={finished}", cwd=tmp_path), "is a training run's dir")
    refused(cli("lr-find", *tiny_run_overrides(tmp_path, None), f"output={finished}", cwd=tmp_path),
            "is a training run's dir")
    assert tree_hash(finished) == before


# ---------------------------------------------------------------- checkpoints and resume


class Payload:  # a class a checkpoint may carry: loading it would run code
    pass


def test_a_checkpoint_that_carries_code_is_named_with_a_fix_that_exists(tmp_path, finished):
    ckpt = torch.load(finished / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["extra"] = Payload()
    carrier = tmp_path / "code.ckpt"
    torch.save(ckpt, carrier)
    message = refused(cli("eval", f"ckpt={carrier}", cwd=tmp_path), "Payload", "could run code")
    assert "\x1b" not in message


def test_resuming_with_another_backbone_offers_a_command_that_fits(tmp_path, finished):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    message = refused(cli("train", f"resume={copy}", "model.backbone=test_resnet", cwd=tmp_path),
                      "'model.backbone' cannot change when resuming")
    fix = message.split("fix: ", 1)[1]
    assert "model.weights" not in fix and fix.count("model.backbone=") == 1 and "model.backbone=test_resnet" in fix


@pytest.mark.slow
def test_ctrl_c_twice_aborts_with_130_and_says_how_to_resume(tmp_path, data):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "transfer_cli", *train_args(data, "trainer.max_epochs=50",
                             "callbacks.checkpoint_every_n_steps=1", "transfer=fine_tune"), f"hydra.run.dir={run}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out[-3000:]
    assert f"transfer train resume={run}" in out and "Traceback" not in out


@pytest.mark.slow
def test_every_shipped_experiment_runs_one_batch(tmp_path, data):
    """lightning-hydra-template's check: each experiment under debug=fast_dev_run, as one glob sweep."""
    rows = ["path,label"] + [f"{p},cat;dog" for p in sorted((data / "train" / "cat").glob("*.png"))] + \
        [f"{p},dog" for p in sorted((data / "train" / "dog").glob("*.png"))]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out = cli("train", "-m", "experiment=glob(*)", "debug=fast_dev_run", "model.pretrained=false", "trainer=cpu",
              "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0", f"data.root={data}",
              f"data.csv={tmp_path / 'labels.csv'}", "callbacks.rich_progress=false", "trainer.enable_progress_bar=false",
              f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    from transfer_cli.config.folders import config_groups

    jobs = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/job.json")]
    assert len(jobs) == len(config_groups()["experiment"]) and all(j["status"] == "ok" for j in jobs), jobs


def test_byte_identical_images_across_splits_are_counted_and_warned_about(tmp_path, caplog):
    from conftest import tiny_cfg

    from transfer_cli.train import train

    root = _make_image_folder(tmp_path / "d")
    shutil.copy(root / "train" / "cat" / "img000.png", root / "val" / "cat" / "copy.png")  # a leak into val
    with caplog.at_level("WARNING", logger="transfer_cli"):
        summary = train(tiny_cfg(tmp_path, root, "trainer.max_epochs=1", "augmentation=none"))
    assert summary["duplicates_across_splits"] == 2  # the two copies of one image
    assert "leakage: 2 files are byte-identical" in caplog.text
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert {f["split"] for f in report["duplicates_across_splits"][0]["files"]} == {"train", "val"}
