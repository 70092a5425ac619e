"""What keeps training fast, checked for correctness on the CPU (speed itself is measured by scripts/benchmark.py):
the first-step latency in the summary, cheap per-batch seeding, no per-step reads of device values, the choice of
fused/foreach optimizer kernels, trainer.compile's modes, trainer.precision=auto and the EMA update."""

from __future__ import annotations

import csv
import json
import os
import random

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import make_run, tiny_cfg

from transfer_cli.assembly.model import COMPILE_MODES, compile_mode
from transfer_cli.config.resolve import resolve_run
from transfer_cli.config.compose import as_schema, compose
from transfer_cli.data.loaders import resolve_num_workers
from transfer_cli.errors import TransferError
from transfer_cli.seeding import seed_globals
from transfer_cli.train import train
from transfer_cli.training.optim import build_optimizer, kernel_flags
from transfer_cli.training.tta import tta_logits

HEAD_ONLY = ("transfer=feature_extract", "augmentation=none")


# ---------------------------------------------------------------- first-step latency


def test_summary_reports_the_first_step_latency(tmp_path, tiny_imagefolder, capsys):
    summary = train(tiny_cfg(tmp_path, tiny_imagefolder, "trainer.max_epochs=1", "transfer=fine_tune"))
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["first_step_latency_s"] == summary["first_step_latency_s"]
    assert 0 < summary["first_batch_latency_s"] <= summary["first_step_latency_s"] <= summary["wall_time_s"]
    assert "first_step_latency_s" in capsys.readouterr().out  # the printed summary


# ---------------------------------------------------------------- per-step host work


def test_per_batch_seeding_draws_what_torch_manual_seed_draws():
    def draws():
        return torch.rand(3), torch.randint(0, 1000, (3,)), np.random.rand(2), random.random()

    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    expected = draws()
    torch.manual_seed(0)  # disturb every generator
    seed_globals(1234)
    got = draws()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert np.array_equal(got[2], expected[2]) and got[3] == expected[3]


class BarDictSpy(pl.Callback):
    """What Lightning's progress-bar dict holds at the end of each training batch of the first epoch: Lightning
    converts whatever is there to Python floats after every batch, which on a GPU is a device sync per step."""

    def __init__(self):
        self.keys = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0:  # later epochs also hold the previous epoch's results
            self.keys |= set(trainer.progress_bar_metrics)


def test_no_metric_is_read_from_the_device_every_step_but_the_logs_stay(tmp_path, tiny_imagefolder):
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, "trainer.max_epochs=2", "transfer=fine_tune",
                   "trainer.log_every_n_steps=2", "callbacks.rich_progress=true", "trainer.enable_progress_bar=true")
    run = make_run(cfg, tmp_path / "run")
    spy = BarDictSpy()
    run.trainer.callbacks.append(spy)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert spy.keys == set(), "a per-step value in the progress-bar dict is read back after every batch"
    shown = run.trainer.progress_bar_callback.get_metrics(run.trainer, run.module)
    assert {"train/loss_step", "train/loss_epoch", "train/acc", "val/acc", "val/loss"} <= set(shown)
    # metrics.csv as before: the step loss every 2 steps, the epoch means and metrics once per epoch
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["train/loss_step"]] == [1, 3, 5, 7]
    epoch_rows = [r for r in rows if r["train/acc"]]
    assert [r["epoch"] for r in epoch_rows] == ["0", "1"] and all(r["train/loss_epoch"] for r in epoch_rows)
    assert len([r for r in rows if r["val/acc"]]) == 2


def test_train_acc_is_the_accuracy_over_every_batch_of_the_epoch(tmp_path, tiny_imagefolder):
    """Updated per batch, computed once at the epoch's end: the accuracy of all the epoch's training logits."""
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, "trainer.max_epochs=1", *HEAD_ONLY, "data.batch_size=3")
    run = make_run(cfg, tmp_path / "run")
    logits, targets = [], []
    run.model.head.register_forward_hook(
        lambda module, args, out: logits.append(out.detach()) if run.trainer.training else None)

    class Targets(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            targets.append(batch[1])

    run.trainer.callbacks.append(Targets())
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert len(logits) == len(targets) == 6 and len(torch.cat(targets)) == 16  # every image, in batches of 3
    expected = (torch.cat(logits).argmax(-1) == torch.cat(targets)).float().mean().item()
    assert float(run.trainer.callback_metrics["train/acc"]) == pytest.approx(expected)


# ---------------------------------------------------------------- optimizer kernels


def optimizer_class(name):
    from timm.optim import get_optimizer_class

    return get_optimizer_class(name, bind_defaults=False)


@pytest.mark.parametrize("name,device,clip,mixed,flags", [
    ("adamw", "cuda", False, True, {"fused": True}),
    ("adam", "cuda", False, False, {"fused": True}),
    ("nesterov", "cuda", True, False, {"fused": True}),  # clipping without mixed precision: Lightning clips
    ("adamw", "cuda", True, True, {"foreach": True}),  # Lightning refuses to clip a fused optimizer under AMP
    ("rmsprop", "cuda", False, True, {"foreach": True}),  # torch's RMSprop has no fused kernel
    ("lamb", "cuda", False, True, {"foreach": True}),  # timm's
    ("lion", "cuda", False, True, {"foreach": True}),
    ("adamw", "cpu", False, False, {}),  # torch's defaults off CUDA
])
def test_kernel_flags_per_optimizer_and_device(name, device, clip, mixed, flags):
    got, why = kernel_flags(optimizer_class(name), device, {}, clip=clip, mixed_precision=mixed)
    assert got == flags
    assert (why is not None) == (clip and mixed and name == "adamw")


def test_kernel_flags_leave_the_users_choice_alone():
    assert kernel_flags(optimizer_class("adamw"), "cuda", {"foreach": False})[0] == {}
    assert kernel_flags(optimizer_class("adamw"), "cuda", {"fused": False})[0] == {}


def test_optimizer_on_cpu_keeps_torchs_default_kernels():
    opt_cfg = as_schema(compose(["~experiment", "optimizer=adamw"])).optimizer
    optimizer = build_optimizer([{"params": [torch.nn.Parameter(torch.ones(2))]}], opt_cfg, "cpu")
    assert not optimizer.defaults.get("fused") and optimizer.defaults.get("foreach") is None


class FusedAdamW(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).float().pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1, fused=True)


def test_lightning_still_refuses_to_clip_a_fused_optimizer_under_mixed_precision(tmp_path):
    """Why kernel_flags falls back to foreach when clipping with mixed precision; if Lightning ever allows it,
    this fails and the fallback can go."""
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", gradient_clip_val=1.0, max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="fused"):
        trainer.fit(FusedAdamW(), data)


# ---------------------------------------------------------------- trainer.compile, trainer.precision


@pytest.mark.parametrize("value,mode", [(False, None), (True, "default"), ("false", None), ("true", "default"),
                                        ("default", "default"), ("reduce-overhead", "reduce-overhead"),
                                        ("max-autotune", "max-autotune"), (None, None)])
def test_compile_modes(value, mode):
    assert compile_mode(value) == mode


@pytest.mark.parametrize("override,expected", [("trainer.compile=true", "default"),
                                               ("trainer.compile=false", None),
                                               ("trainer.compile=reduce-overhead", "reduce-overhead")])
def test_compile_overrides_compose(override, expected):
    assert compile_mode(as_schema(compose(["~experiment", override])).trainer.compile) == expected


def test_an_unknown_compile_mode_names_the_choices():
    with pytest.raises(TransferError) as error:
        compose(["~experiment", "trainer.compile=fast"])
    assert all(name in error.value.fix for name in COMPILE_MODES)


def test_compiled_training_batches_all_have_one_shape(tmp_path, tiny_imagefolder):
    shapes = {}
    for mode in ("false", "reduce-overhead"):  # only the loaders are built: nothing is compiled here
        cfg = tiny_cfg(tmp_path, tiny_imagefolder, "data.batch_size=6", f"trainer.compile={mode}", run=mode)
        run = make_run(cfg, tmp_path / mode)
        run.images.setup("fit")
        train_sizes = [len(run.images.strip_bad(b)[1]) for b in run.images.train_dataloader()]
        val_sizes = [len(run.images.strip_bad(b)[1]) for b in run.images.val_dataloader()]
        shapes[mode] = (train_sizes, val_sizes)
    assert shapes["false"][0] == [6, 6, 4]  # 16 images
    assert shapes["reduce-overhead"][0] == [6, 6]  # the partial batch dropped (a different one each epoch)
    assert shapes["reduce-overhead"][1] == shapes["false"][1]  # evaluation sees every image


def test_tta_in_one_call_averages_the_same_views():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    calls = []

    def forward(x):
        calls.append(len(x))
        return net(x)

    images = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        each = tta_logits(forward, images, "flips")
        together = tta_logits(forward, images, "flips", one_call=True)
    assert calls == [3, 3, 3, 3, 12]
    assert torch.allclose(each, together, atol=1e-6)


def test_precision_auto_without_a_gpu_is_32_true(tmp_path, tiny_imagefolder):
    gpu = as_schema(compose(["~experiment", "trainer=gpu"]))
    assert gpu.trainer.precision == "auto"
    cpu = as_schema(tiny_cfg(tmp_path, tiny_imagefolder, "trainer.precision=auto"))
    if not torch.cuda.is_available():
        assert resolve_run(gpu).trainer.precision == "32-true"
    assert resolve_run(cpu).trainer.precision == "32-true"
    summary = train(tiny_cfg(tmp_path, tiny_imagefolder, "trainer.precision=auto", "trainer.max_epochs=1",
                             *HEAD_ONLY))
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "precision: 32-true" in saved and summary["epochs"] == 1  # the run dir records what ran


def test_num_workers_auto_uses_every_core_but_one():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert resolve_num_workers("auto") == max(0, cores - 1)
    assert resolve_num_workers(3) == 3


# ---------------------------------------------------------------- EMA


class RawWeights(pl.Callback):
    """The raw weights after every optimizer step (EMA swaps its average in only for validation)."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def test_ema_is_the_exponential_average_of_the_steps_weights(tmp_path, tiny_imagefolder):
    decay = 0.7
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *HEAD_ONLY, "callbacks.ema=true", f"callbacks.ema_decay={decay}",
                   "trainer.max_epochs=2", "optimizer.lr=0.05", "data.batch_size=4")
    run = make_run(cfg, tmp_path / "run")
    raw = RawWeights()
    run.trainer.callbacks.insert(0, raw)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert len(raw.steps) == 8
    expected = {k: v.double() for k, v in raw.steps[0].items()}  # the first update copies the weights
    for weights in raw.steps[1:]:
        for k, v in weights.items():
            if v.is_floating_point():
                expected[k] = decay * expected[k] + (1 - decay) * v.double()
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ema = last["state_dict"]
    assert set(ema) == set(expected)
    for k, v in ema.items():
        if v.is_floating_point():
            assert torch.allclose(v.double(), expected[k], rtol=1e-5, atol=1e-7), k
    assert int(last["averaging_state"]["n_averaged"]) == 8
    head = [k for k in ema if k.startswith("model.head.")]
    assert any(not torch.equal(ema[k], last["current_model_state"][k]) for k in head)
    # the model holds the average once training ends (Lightning's callback copies it in)
    assert all(torch.equal(run.module.state_dict()[k], ema[k]) for k in head)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only with a CUDA device")
def test_a_training_step_does_not_wait_for_the_gpu(tmp_path, tiny_imagefolder):
    """On a GPU: after the first steps, no training step syncs the host with the device (metrics, logging,
    seeding, optimizer, EMA). metrics.csv reads the device only at its logging steps (none here) and the progress
    bar at most 4 times a second (off here: its reads are by design)."""

    class SyncCheck(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step >= 2:
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("default")

    cfg = tiny_cfg(tmp_path, tiny_imagefolder, "trainer=gpu", "trainer.max_epochs=1", "transfer=fine_tune",
                   "callbacks.ema=true", "trainer.log_every_n_steps=100", "data.batch_size=2")
    run = make_run(cfg, tmp_path / "run")
    run.trainer.callbacks.insert(0, SyncCheck())
    try:
        run.trainer.fit(run.module, datamodule=run.datamodule)
    finally:
        torch.cuda.set_sync_debug_mode("default")
