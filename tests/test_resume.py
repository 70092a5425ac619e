"""Resume: bitwise-exact continuation, extension, refused overrides, fingerprints, damaged checkpoints, signals.

Interruptions are real: an in-process SIGTERM sent by a small callback at a chosen step (Lightning's own signal
path), and subprocess runs of `python -m transfer_cli train` stopped with SIGKILL / SIGTERM.
"""

from __future__ import annotations

import csv
import math
import os
import random
import shlex
import shutil
import signal
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from conftest import tiny_run_overrides, transfer_popen
from transfer_cli.config.compose import compose
from transfer_cli.errors import TransferError
from transfer_cli.atomic import atomic_torch_save, leftover_temp_files
from transfer_cli.resume.checkpoints import checkpoint_config, read_checkpoint, resolve_checkpoint
from transfer_cli.resume.fit import fit
from transfer_cli.resume.plan import load_resumable, plan_resume
from transfer_cli.assembly.run import build_run
from transfer_cli.train import train
from transfer_cli.training.schedules import lr_factor

BACKBONE = "test_efficientnet"
REPO = Path(__file__).resolve().parents[1]


def overrides(root, out, *extra):
    return tiny_run_overrides(root, out, "trainer.deterministic=true", "trainer.max_epochs=4", *extra,
                              backbone=BACKBONE)


class SignalAt(pl.Callback):
    """Sends this process a real signal after the given optimizer step (or at the end of the given epoch)."""

    def __init__(self, signum=signal.SIGTERM, step=None, epoch_end=None):
        self.signum, self.step, self.epoch_end = signum, step, epoch_end

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == self.epoch_end:
            os.kill(os.getpid(), self.signum)


def interrupted_run(cfg, **at) -> int:
    """Train `cfg` until SignalAt(**at) fires; returns the exit status fit() asked for."""
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = build_run(cfg, run_dir)
    run.trainer.callbacks.append(SignalAt(**at))
    with pytest.raises(SystemExit) as stopped:
        fit(run.trainer, run.module, run.datamodule, cfg.resume, run_dir)
    return stopped.value.code


def weights(path):
    return read_checkpoint(path)["state_dict"]


def max_abs_diff(a, b):
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def epoch_rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    return [(r["epoch"], r["step"], r["val/loss"], r["val/acc"]) for r in rows]


def train_epoch_rows(run_dir):
    """What each training epoch logged at its end: also the one a resume restarted in its middle."""
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    return [(r["epoch"], r["step"], r["train/loss_epoch"], r["train/acc"]) for r in rows]


EXACT_CASES = {
    # fine-tuning with random crops and flips, stopped at an epoch boundary (after epoch 1 of 0..3)
    "fine_tune-epoch_end": (["transfer=fine_tune", "augmentation=light"], {"epoch_end": 1}),
    # gradual unfreezing whose milestone (epoch 3) comes after the stop, stopped by Ctrl+C (SIGINT) mid-epoch
    # (step 6 = batch 2 of epoch 1), with a dropout head and mixup drawing from the global RNGs
    "gradual_unfreeze-mid_epoch": (["transfer=gradual_unfreeze", "transfer.unfreeze={0: head, 3: [stage-1], 4: all}",
                                    "augmentation=light", "augmentation.mixup_alpha=0.4", "model.head_hidden_dim=16",
                                    "model.head_dropout=0.3"], {"step": 6, "signum": signal.SIGINT}),
    # gradual unfreezing stopped in the middle of epoch 2 (step 10), after two milestones: the resumed half epoch
    # must train the stages thawed by then, with their BatchNorm in train mode
    "gradual_unfreeze-after_milestones": (["transfer=gradual_unfreeze", "augmentation=light"], {"step": 10}),
    # stochastic weight averaging from epoch 1, stopped in the middle of epoch 2 (step 10): the average of the epochs
    # before the stop and the raw weights both come back (training/swa.py)
    "swa-mid_epoch": (["transfer=fine_tune", "augmentation=light", "callbacks.swa=true", "callbacks.swa_start=0.25"],
                      {"step": 10}),
    # LoRA adapters on a tiny ViT (dropout on their input draws from the global RNG), stopped mid-epoch 1 (step 6)
    "lora-mid_epoch": (["transfer=lora", "model.backbone=test_vit", "transfer.lora_rank=2", "transfer.lora_dropout=0.1"],
                       {"step": 6}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_interrupted_and_resumed_run_equals_uninterrupted_bitwise(tmp_path, tiny_imagefolder, case):
    extra, at = EXACT_CASES[case]
    reference = train(compose(overrides(tiny_imagefolder, tmp_path / "ref", *extra)))

    status = interrupted_run(compose(overrides(tiny_imagefolder, tmp_path / "run", *extra)), **at)
    assert status == 128 + at.get("signum", signal.SIGTERM)  # 143 for SIGTERM, 130 for SIGINT
    stopped = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert stopped["global_step"] == at.get("step", 8)

    plan = plan_resume(str(tmp_path / "run"), [])
    resumed = train(plan.config)

    ref_w, res_w = weights(reference["last_checkpoint"]), weights(resumed["last_checkpoint"])
    diff = max_abs_diff(ref_w, res_w)
    print(f"{case}: max abs weight diff {diff}")  # recorded for the note
    assert all(torch.equal(ref_w[k], res_w[k]) for k in ref_w), f"max abs diff {diff}"
    # the same validation and training metrics, each epoch logged once in the continued metrics.csv, one line end
    assert epoch_rows(tmp_path / "run") == epoch_rows(tmp_path / "ref")
    assert train_epoch_rows(tmp_path / "run") == train_epoch_rows(tmp_path / "ref")
    assert b"\r\n" not in (tmp_path / "run" / "metrics.csv").read_bytes()
    assert [r[0] for r in epoch_rows(tmp_path / "run")] == ["0", "1", "2", "3"]
    assert resumed["val_acc"] == reference["val_acc"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch run (constant LR, cached features: seconds) whose dir tests copy before changing."""
    from conftest import _make_image_folder

    base = tmp_path_factory.mktemp("finished")
    root = _make_image_folder(base / "data")
    with pytest.MonkeyPatch.context() as mp:  # its own feature cache, like every test's (conftest)
        mp.setenv("TRANSFER_CACHE_DIR", str(base / "feature-cache"))
        train(compose(overrides(root, base / "run", "trainer.max_epochs=2", "augmentation=none", "transfer.head_solver=sgd")))
    return base / "run"


def copy_run(run_dir, dest):
    shutil.copytree(run_dir, dest)
    return dest


def test_checkpoints_are_plain_data_with_config_and_fingerprint(finished_run):
    for name in ("last.ckpt", "best.ckpt"):
        ckpt = torch.load(finished_run / "checkpoints" / name, map_location="cpu", weights_only=True)
        meta = ckpt["transfer"]
        assert meta["fingerprint"] == {"backbone": BACKBONE, "class_names": ["cat", "dog"], "num_classes": 2,
                                       "task": "multiclass"}
        assert checkpoint_config(ckpt).trainer.max_epochs == 2
    assert resolve_checkpoint(finished_run) == (finished_run / "checkpoints" / "best.ckpt").resolve()
    assert resolve_checkpoint(finished_run, prefer="last").name == "last.ckpt"
    assert oct((finished_run / "checkpoints" / "last.ckpt").stat().st_mode & 0o777) != oct(0o600)


def test_disallowed_override_on_resume_names_the_key(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    with pytest.raises(TransferError) as err:
        plan_resume(str(run), ["trainer.max_epochs=3", "optimizer.lr=0.1"])
    assert "'optimizer.lr' cannot change when resuming" in err.value.message
    assert "model.weights=" in err.value.fix and "optimizer.lr=0.1" in err.value.fix
    with pytest.raises(TransferError, match="'transfer' cannot change"):
        plan_resume(str(run), ["transfer=fine_tune"])
    plan = plan_resume(str(run), ["trainer.max_epochs=3", "data.num_workers=0"])  # safe ones pass
    assert plan.config.trainer.max_epochs == 3 and plan.run_dir == run.resolve()
    assert plan.config.resume == str((run / "checkpoints" / "last.ckpt").resolve())


def test_truncated_last_checkpoint_is_skipped_for_the_newest_readable(finished_run, tmp_path, caplog):
    run = copy_run(finished_run, tmp_path / "run")
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a write cut short
    with pytest.raises(TransferError, match="cannot read checkpoint .*last.ckpt"):
        read_checkpoint(last)
    ckpt, content = load_resumable(run)
    assert ckpt.name == "best.ckpt" and content["global_step"] > 0
    assert "last.ckpt is unreadable" in caplog.text
    assert plan_resume(str(run), []).checkpoint.name == "best.ckpt"


def test_resume_last_picks_the_newest_run_of_the_experiment_with_a_checkpoint(finished_run, tmp_path,
                                                                               monkeypatch):
    older = copy_run(finished_run, tmp_path / "outputs" / "tiny" / "2026-01-01_10-00-00")
    newer = copy_run(finished_run, tmp_path / "outputs" / "tiny" / "2026-01-02_10-00-00")
    empty = tmp_path / "outputs" / "tiny" / "2026-01-03_10-00-00"  # started, failed before any checkpoint
    empty.mkdir()
    now = time.time()
    for age, run in ((300, older), (200, newer), (100, empty)):
        os.utime(run, (now - age, now - age))
    monkeypatch.chdir(tmp_path)
    plan = plan_resume("last", ["name=tiny"])
    assert plan.run_dir == newer.resolve()
    assert plan.config.paths.output_dir == str(newer.resolve())  # the run dir as it is now
    with pytest.raises(TransferError, match="no run of experiment 'other'"):
        plan_resume("last", ["name=other"])


def test_atomic_save_keeps_the_previous_file_when_a_write_fails(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"w": torch.ones(3)}, target)
    with pytest.raises(Exception):
        atomic_torch_save({"w": torch.zeros(3), "bad": lambda: None}, target)  # cannot be serialized
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))
    assert leftover_temp_files(tmp_path) == []


def test_fingerprint_mismatch_stops_the_resume(tmp_path, make_image_folder):
    from conftest import write_class_images
    import numpy as np

    root = make_image_folder(tmp_path / "data")
    train(compose(overrides(root, tmp_path / "run", "trainer.max_epochs=1", "augmentation=none", "transfer.head_solver=sgd")))
    write_class_images(root / "train" / "bird", 2, 4, 32, np.random.default_rng(0))  # the data set changed
    write_class_images(root / "val" / "bird", 2, 2, 32, np.random.default_rng(1))
    plan = plan_resume(str(tmp_path / "run"), ["trainer.max_epochs=2"])
    with pytest.raises(TransferError) as err:
        train(plan.config)
    assert "does not match its checkpoint" in err.value.message and "new: ['bird']" in err.value.message
    assert "model.weights=" in err.value.fix


@pytest.mark.slow
def test_extending_max_epochs_follows_the_new_cosine_horizon(tmp_path, tiny_imagefolder):
    lr = 0.01
    cfg = compose(overrides(tiny_imagefolder, tmp_path / "run", "trainer.max_epochs=2", "augmentation=none",
                            "scheduler=cosine", f"optimizer.lr={lr}", "logger=csv", "transfer.head_solver=sgd"))
    train(cfg)
    resumed = train(plan_resume(str(tmp_path / "run"), ["trainer.max_epochs=4"]).config)
    assert resumed["epochs"] == 4
    with open(tmp_path / "run" / "metrics.csv") as f:
        # LearningRateMonitor logs each epoch's starting LR at its first step
        lrs = {int(r["step"]): float(r["lr-AdamW/head/decay"]) for r in csv.DictReader(f) if r["lr-AdamW/head/decay"]}
    steps_per_epoch = 4
    assert sorted(lrs) == [0, 4, 8, 12]
    # epoch 2 starts at step 8: on the new 16-step horizon the cosine is half-way (factor 0.5), where the old
    # 8-step one had reached its floor (0)
    expected = lr * lr_factor(8, cfg.scheduler, steps_per_epoch, 16)
    assert expected == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert lrs[8] == pytest.approx(expected, rel=1e-12)
    assert lrs[12] == pytest.approx(lr * lr_factor(12, cfg.scheduler, steps_per_epoch, 16), rel=1e-12)
    assert lrs[4] == pytest.approx(lr * lr_factor(4, cfg.scheduler, steps_per_epoch, 8), rel=1e-12)  # first part


# ------------------------------------------------------------------ subprocesses: kill -9 and SIGTERM


def cli(*args, cwd=None):
    return transfer_popen("train", *args, cwd=cwd)


def saved_step(path: Path) -> int:
    try:  # written atomically, so a checkpoint that exists is whole
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except FileNotFoundError:
        return -1


def wait_for_step(run: Path, step: int, proc, timeout=300):
    """Until the run's last.ckpt (refreshed every step) holds at least `step` optimizer steps."""
    start = time.time()
    while saved_step(run / "checkpoints" / "last.ckpt") < step:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() - start < timeout, f"step {step} was not reached"
        time.sleep(0.05)


SUBPROCESS_RUN = ["augmentation=light", "trainer.max_epochs=6", "callbacks.checkpoint_every_n_steps=1"]
# Every transfer mode; gradual unfreezing thaws a stage from the top every epoch (and layer_decay), so any kill after
# epoch 0 lands in an epoch whose freeze state differs from the first one's.
MODES = {
    "fine_tune": ["transfer=fine_tune"],
    "partial": ["transfer=partial", "transfer.freeze_stages=2"],
    "gradual_unfreeze": ["transfer=gradual_unfreeze"],
    "feature_extract": ["transfer=feature_extract", "transfer.cache_features=false"],
}


@pytest.fixture(scope="module")
def reference_6_epochs(tmp_path_factory):
    """mode -> (data root, the uninterrupted run's weights and buffers), trained once per mode on first use."""
    from conftest import _make_image_folder

    base = tmp_path_factory.mktemp("reference")
    root = _make_image_folder(base / "data")
    done = {}

    def get(mode):
        if mode not in done:
            summary = train(compose(overrides(root, base / mode, *SUBPROCESS_RUN, *MODES[mode])))
            done[mode] = root, weights(summary["last_checkpoint"])
        return done[mode]

    return get


def start_subprocess_run(root, run, cwd, mode="fine_tune"):
    args = [a for a in overrides(root, run, *SUBPROCESS_RUN, *MODES[mode]) if not a.startswith("paths.")]
    return cli(*args, f"hydra.run.dir={run}", cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_kill_9_at_a_random_step_then_resume_finishes_the_same_run(tmp_path, reference_6_epochs, mode):
    root, reference = reference_6_epochs(mode)
    run = tmp_path / "run"
    proc = start_subprocess_run(root, run, tmp_path, mode)
    # Of 24 steps (4 an epoch), inside an epoch after the first: the kill may land mid-step or mid-write of the
    # next checkpoint, and the resumed epoch restarts in its middle.
    target = random.SystemRandom().choice([s for s in range(5, 23) if s % 4])
    wait_for_step(run, target, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = read_checkpoint(resolve_checkpoint(run, prefer="last"))["global_step"]

    resumed = cli(f"resume={run}", cwd=tmp_path)
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out[-3000:]
    final = weights(run / "checkpoints" / "last.ckpt")
    diff = max_abs_diff(reference, final)
    print(f"{mode}: kill -9 at step {target} (last.ckpt: step {killed_at}) of 24: resumed, max abs diff of the "
          f"weights and buffers to the uninterrupted run {diff}")
    assert all(torch.equal(reference[k], final[k]) for k in reference), f"max abs diff {diff}"
    assert [r[0] for r in epoch_rows(run)] == [str(e) for e in range(6)]  # metrics.csv continued, no duplicates


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint_and_prints_the_command(tmp_path, reference_6_epochs):
    root, reference = reference_6_epochs("fine_tune")
    run = tmp_path / "run"
    proc = start_subprocess_run(root, run, tmp_path)
    # Two epochs left at the latest: the signal must land in the fit, not after it (the poll reads the checkpoint,
    # which on a loaded machine can take longer than the tiny run's last steps).
    wait_for_step(run, random.SystemRandom().randint(1, 16), proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out[-3000:]
    stopped_at = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    command = next(line for line in out.splitlines() if line.startswith("resume with: "))[len("resume with: "):]
    assert command == f"transfer train resume={shlex.quote(str(run))}"

    resumed = cli(*shlex.split(command)[2:], cwd=tmp_path)  # the printed command, as `python -m transfer_cli`
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out[-3000:]
    diff = max_abs_diff(reference, weights(run / "checkpoints" / "last.ckpt"))
    print(f"SIGTERM after step {stopped_at} of 24: exit 143, resumed, max abs weight diff {diff}")
    assert diff == 0.0


def test_a_resume_reads_its_checkpoint_from_disk_once(tmp_path, tiny_imagefolder, monkeypatch):
    """The plan, the fingerprint check, the metrics log and Lightning's restore share one read."""
    # Calibration off: at the end of a run it reads the newly written checkpoints (another file, the same name).
    train(compose(overrides(tiny_imagefolder, tmp_path / "run", "trainer.max_epochs=1", "augmentation=none",
                            "transfer.head_solver=sgd", "calibration.temperature=false")))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(Path(f)) or real_load(f, *a, **k))
    resumed = train(plan_resume(str(tmp_path / "run"), ["trainer.max_epochs=2"]).config)
    assert resumed["epochs"] == 2
    assert reads.count(last) == 1
