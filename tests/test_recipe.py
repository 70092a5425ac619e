"""The training recipe in real Lightning runs on tiny data: optimizers, LR schedules (read back from the optimizer
at every step), gradient clipping, EMA weights, the balanced sampler, test-time augmentation, and the finders."""

import copy
import math
from collections import Counter

import numpy as np
import pytest
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from conftest import load_ckpt, make_run, tiny_cfg, tiny_run_overrides, write_class_images
from PIL import Image

from transfer_cli.cli import main as cli_main
from transfer_cli.config.compose import as_schema, compose
from transfer_cli.data.samplers import BalancedEpochSampler
from transfer_cli.commands.lr_find import FinderOptions, find_lr
from transfer_cli.models.backbone import create_backbone
from transfer_cli.train import train
from transfer_cli.training.ema import RAW_WEIGHTS_KEY
from transfer_cli.training.tta import tta_views

BACKBONE = "test_efficientnet"
# cached features, the epoch loop: the fastest runs that step an optimizer
HEAD_ONLY = ["transfer=feature_extract", "augmentation=none", "transfer.head_solver=sgd"]
ONE_EPOCH = ("trainer.max_epochs=1", "logger=none")


class LRRecorder(pl.Callback):
    """Every group's LR at the start of each training batch, with the optimizer step count at that time."""

    def __init__(self):
        self.rows = []  # (global_step, epoch, [lr of each group])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        groups = trainer.optimizers[0].param_groups
        self.rows.append((trainer.global_step, trainer.current_epoch, [g["lr"] for g in groups]))


def fit_recording_lrs(cfg, tmp_path):
    run = make_run(cfg, tmp_path / "run")
    recorder = LRRecorder()
    run.trainer.callbacks.append(recorder)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return run, recorder.rows


# ---------------------------------------------------------------- optimizers


@pytest.mark.parametrize("name", ["sgd", "adamw", "adam", "rmsprop", "lamb", "lion"])
def test_each_optimizer_trains_one_epoch(tmp_path, tiny_imagefolder, name):
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *ONE_EPOCH, f"optimizer={name}", "transfer=fine_tune", "augmentation=none",
                   "transfer.backbone_lr_scale=0.5", "scheduler=constant", "data.batch_size=8")
    run = make_run(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.trainer.fit(run.module, datamodule=run.datamodule)
    optimizer = run.trainer.optimizers[0]
    assert type(optimizer).__name__.lower() == {"sgd": "sgd", "adamw": "adamw", "adam": "adam",
                                                "rmsprop": "rmsprop", "lamb": "lamb", "lion": "lion"}[name]
    for group in optimizer.param_groups:  # constant schedule: each group still at optimizer.lr x its scale
        scale = 0.5 if group["name"].startswith("backbone") else 1.0
        assert group["lr"] == pytest.approx(cfg.optimizer.lr * scale, rel=1e-12)
        assert group["weight_decay"] == (0.0 if group["name"].endswith("no_decay") else cfg.optimizer.weight_decay)
    after = run.model.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("head."))
    moved = [k for k in before if k.startswith("backbone.") and k.endswith("weight") and not torch.equal(after[k],
                                                                                                         before[k])]
    assert moved, "the backbone did not train"
    assert math.isfinite(float(run.trainer.callback_metrics["train/loss_epoch"]))


# ---------------------------------------------------------------- schedules: the LR curve, step by step


def _closed_form(name, step, spe, total):
    """Each schedule written out independently of transfer_cli.training.schedules (warmup: 1 epoch from 0)."""
    warm = spe
    if name != "onecycle" and step < warm:
        return step / warm
    epoch = step // spe
    if name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
    if name == "step":  # step_epochs=2, gamma=0.5
        return 0.5 ** (epoch // 2)
    if name == "multistep":  # milestones [1, 3], gamma=0.5
        return 0.5 ** ((epoch >= 1) + (epoch >= 3))
    if name == "exponential":  # gamma=0.8
        return 0.8**epoch
    if name == "constant":
        return 1.0
    raise AssertionError(name)


def _torch_onecycle(total, lr):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, cycle_momentum=False)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("name", ["cosine", "step", "multistep", "exponential", "onecycle", "constant"])
def test_lr_at_every_step_matches_the_closed_form(tmp_path, tiny_imagefolder, name):
    warmup = ["scheduler.warmup_epochs=0"] if name == "onecycle" else ["scheduler.warmup_epochs=1",
                                                                       "scheduler.warmup_start_factor=0"]
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *ONE_EPOCH, *HEAD_ONLY, f"scheduler={name}", *warmup, "trainer.max_epochs=4",
                   "optimizer.lr=0.1", "scheduler.min_lr_factor=0", "scheduler.step_epochs=2", "scheduler.gamma=0.5",
                   "scheduler.milestones=[1,3]", *(["scheduler.gamma=0.8"] if name == "exponential" else []))
    run, rows = fit_recording_lrs(cfg, tmp_path)
    spe, total = 4, 16  # 16 training images in batches of 4, 4 epochs
    assert [r[0] for r in rows] == list(range(total))
    reference = _torch_onecycle(total, 0.1) if name == "onecycle" else None
    for step, _, lrs in rows:
        expected = reference[step] if reference else 0.1 * _closed_form(name, step, spe, total)
        assert lrs == pytest.approx([expected] * len(lrs), abs=1e-9), f"step {step}"


def test_warmup_in_steps_and_accumulation_count_optimizer_steps(tmp_path, tiny_imagefolder):
    # 4 batches per epoch, 2 accumulated per optimizer step: 2 steps per epoch, 6 in the run.
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *ONE_EPOCH, *HEAD_ONLY, "scheduler=cosine", "scheduler.warmup_steps=2",
                   "trainer.max_epochs=3", "trainer.accumulate_grad_batches=2", "optimizer.lr=0.1")
    run, rows = fit_recording_lrs(cfg, tmp_path)
    assert run.trainer.global_step == 6
    for step, _, lrs in rows:
        expected = 0.1 * (step / 2 if step < 2 else 0.5 * (1 + math.cos(math.pi * (step - 2) / 4)))
        assert lrs == pytest.approx([expected] * len(lrs), abs=1e-9)
    assert [r[0] for r in rows] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_plateau_reduces_the_lr_when_the_metric_is_flat(tmp_path, tiny_imagefolder):
    # An LR this small moves val/loss by far less than ReduceLROnPlateau's relative threshold (1e-4): flat. It is
    # still above its eps=1e-8, below which it leaves the LR alone.
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *ONE_EPOCH, *HEAD_ONLY, "scheduler=plateau", "scheduler.patience=1",
                   "scheduler.gamma=0.5", "scheduler.warmup_epochs=1", "trainer.max_epochs=5", "optimizer.lr=1e-6",
                   "optimizer=sgd", "scheduler.monitor=val/loss", "scheduler.mode=min")
    run, rows = fit_recording_lrs(cfg, tmp_path)
    plateau = run.trainer.lr_scheduler_configs[1]
    assert (plateau.monitor, plateau.scheduler.mode) == ("val/loss", "min")
    per_epoch = {}
    for _, epoch, lrs in rows:
        per_epoch.setdefault(epoch, lrs[0])
    first_of_epoch = [per_epoch[e] for e in range(5)]
    # Epoch 0 warms up; epochs 1-2 hold lr (no improvement yet counted past patience); the decay follows.
    assert first_of_epoch[0] == 0.0
    assert first_of_epoch[1:] == pytest.approx([1e-6, 1e-6, 5e-7, 5e-7], rel=1e-9)


@pytest.mark.parametrize("algorithm", ["value", "norm"])
def test_gradient_clipping(tmp_path, tiny_imagefolder, algorithm):
    seen = []

    class GradProbe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            def probe(optimizer, args, kwargs):  # after the update: the gradients it used, as clipped
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                seen.append((max(float(g.abs().max()) for g in grads), float(norm)))
            trainer.optimizers[0].register_step_post_hook(probe)

    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *ONE_EPOCH, *HEAD_ONLY, "trainer.gradient_clip_val=1e-3",
                   f"trainer.gradient_clip_algorithm={algorithm}", "optimizer=sgd")
    run = make_run(cfg, tmp_path / "run")
    run.trainer.callbacks.append(GradProbe())
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert len(seen) == 4
    for largest, norm in seen:
        if algorithm == "value":
            assert largest == pytest.approx(1e-3, rel=1e-6)  # clipped: some gradient sits exactly at the bound
        else:
            assert norm == pytest.approx(1e-3, rel=1e-4)


# ---------------------------------------------------------------- EMA


def head_loss(run, state_dict, features, labels):
    """The cross-entropy of the run's head with the head weights of `state_dict` (a checkpoint's)."""
    head = copy.deepcopy(run.model.head).eval()
    head.load_state_dict({k.removeprefix("model.head."): v for k, v in state_dict.items()
                          if k.startswith("model.head.")})
    with torch.no_grad():
        return float(F.cross_entropy(head(features), labels))


def test_ema_weights_are_validated_tested_and_saved_beside_the_raw_ones(tmp_path, tiny_imagefolder):
    rng = np.random.default_rng(3)
    for k, c in enumerate(("cat", "dog")):
        write_class_images(tiny_imagefolder / "test" / c, k, 3, 32, rng)
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *ONE_EPOCH, *HEAD_ONLY, "callbacks.ema=true", "callbacks.ema_decay=0.7",
                   "trainer.max_epochs=2", "optimizer.lr=0.05", "callbacks.monitor=val/loss", "callbacks.mode=min")
    run = make_run(cfg, tmp_path / "run")
    run.trainer.fit(run.module, datamodule=run.datamodule)
    val_loss = float(run.trainer.callback_metrics["val/loss"])

    last = load_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt")  # plain data: weights_only=True
    ema, raw = last["state_dict"], last[RAW_WEIGHTS_KEY]
    assert set(ema) == set(raw)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if k.startswith("model.head."))
    val_x, val_y = run.features.tensors["val"].tensors
    assert head_loss(run, ema, val_x, val_y) == pytest.approx(val_loss, rel=1e-5)
    assert head_loss(run, raw, val_x, val_y) != pytest.approx(val_loss, rel=1e-5)

    best = run.trainer.checkpoint_callback.best_model_path
    run.trainer.test(run.module, datamodule=run.datamodule, ckpt_path=best, verbose=False)
    test_x, test_y = run.features.tensors["test"].tensors
    best_ema = load_ckpt(best)["state_dict"]
    assert head_loss(run, best_ema, test_x, test_y) == pytest.approx(float(run.trainer.callback_metrics["test/loss"]),
                                                                rel=1e-5)


# ---------------------------------------------------------------- balanced sampler


def test_balanced_sampler_draws_classes_evenly_and_reproducibly():
    labels = [0] * 900 + [1] * 100
    sampler = BalancedEpochSampler(labels, seed=5)
    first = list(sampler)
    assert list(sampler) == first and len(first) == 1000  # a function of (seed, epoch)
    share = Counter(labels[i] for i in first)[1] / len(first)
    assert 0.45 < share < 0.55
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(BalancedEpochSampler(labels, seed=6)) != first


def test_balanced_sampler_in_the_training_loader(tmp_path):
    root = tmp_path / "imbalanced"
    rng = np.random.default_rng(0)
    for k, (c, n) in enumerate((("common", 18), ("rare", 2))):
        write_class_images(root / "train" / c, k, n, 16, rng)
        write_class_images(root / "val" / c, k, 2, 16, rng)
    cfg = tiny_cfg(tmp_path, root, *ONE_EPOCH, *HEAD_ONLY, "data.sampler=balanced")
    run = make_run(cfg, tmp_path / "run")
    for dm in (run.images, run.datamodule):  # the image loader and the cached-feature loader alike
        dm.setup("fit")
        loader = dm.train_dataloader()
        counts = Counter()
        for epoch in range(10):
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                counts.update(dm.strip_bad(batch)[1].tolist() if hasattr(dm, "strip_bad") else batch[1].tolist())
        assert sum(counts.values()) == 200
        assert 0.4 < counts[1] / 200 < 0.6, counts  # 10 % of the images, about half of the draws


# ---------------------------------------------------------------- test-time augmentation


def test_tta_hflip_averages_the_logits_of_the_flipped_batch(tmp_path, tiny_imagefolder):
    losses = {}
    for tta in ("none", "hflip"):
        cfg = tiny_cfg(tmp_path, tiny_imagefolder, *ONE_EPOCH, "transfer=fine_tune", "augmentation=none", f"eval.tta={tta}")
        run = make_run(cfg, tmp_path / f"run_{tta}")
        run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
        losses[tta] = float(run.trainer.callback_metrics["val/loss"])
    model = run.model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in run.images.val_dataloader():
            images, target = run.images.strip_bad(batch)
            logits.append((model(images) + model(torch.flip(images, dims=[-1]))) / 2)
            labels.append(target)
    expected = float(F.cross_entropy(torch.cat(logits), torch.cat(labels)))
    assert losses["hflip"] == pytest.approx(expected, rel=1e-5)
    assert losses["none"] != pytest.approx(expected, rel=1e-5)


def test_tta_flips_are_the_four_flips_of_the_batch():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    views = tta_views(images, "flips")
    expected = [images, images.flip(-1), images.flip(-2), images.flip(-1).flip(-2)]
    assert len(views) == 4 and all(torch.equal(v, e) for v, e in zip(views, expected))


def test_tta_multicrop_runs_and_cached_features_skip_tta(tmp_path, tiny_imagefolder, caplog):
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *ONE_EPOCH, "transfer=fine_tune", "augmentation=none", "eval.tta=multicrop")
    run = make_run(cfg, tmp_path / "run")
    run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
    assert math.isfinite(float(run.trainer.callback_metrics["val/loss"]))
    with caplog.at_level("WARNING", logger="transfer_cli"):
        cached = make_run(tiny_cfg(tmp_path, tiny_imagefolder, *ONE_EPOCH, *HEAD_ONLY, "eval.tta=hflip"), tmp_path / "run2")
    assert cached.feature_cache and cached.module.tta is None
    assert "eval.tta=hflip ignored" in caplog.text


# ---------------------------------------------------------------- finders and model options


def test_lr_find_writes_the_plot_and_a_finite_suggestion(tmp_path, tiny_imagefolder):
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *ONE_EPOCH, *HEAD_ONLY, "callbacks.ema=true")
    result = find_lr(cfg, tmp_path / "lr_find", FinderOptions(num_training=30, min_lr=1e-5, max_lr=10))
    with Image.open(result.plot) as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert result.suggestion is not None and 1e-5 <= result.suggestion <= 10
    assert len(result.lrs) == 30 and result.lrs == sorted(result.lrs)
    assert result.override == f"optimizer.lr={result.suggestion:.3g}"


def test_lr_find_command(tmp_path, tiny_imagefolder, capsys):
    out = tmp_path / "finder"
    cli_main(["lr-find", *tiny_run_overrides(tiny_imagefolder, None, *HEAD_ONLY, "num_training=20", f"output={out}",
                                             backbone=BACKBONE)])
    printed = capsys.readouterr().out
    assert (out / "lr_find.png").is_file() and (out / "lr_find.json").is_file()
    assert "optimizer.lr=" in printed and "transfer train" in printed


def test_lr_find_rejects_a_mistyped_override_with_the_fix(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["lr-find", "optimizer.lrr=1e-3"])
    assert exit_info.value.code == 2
    assert "optimizer.lr" in capsys.readouterr().err


def test_auto_batch_size_grows_the_batch_before_fit(tmp_path, tiny_imagefolder):
    summary = train(tiny_cfg(tmp_path, tiny_imagefolder, *ONE_EPOCH, *HEAD_ONLY, "trainer.auto_batch_size=true",
                             "data.batch_size=2"))
    assert summary["batch_size"] == 16  # doubled until the batch holds the whole training set
    assert summary["epochs"] == 1


def test_drop_rates_reach_timm():
    cfg = as_schema(compose(["~experiment", f"model.backbone={BACKBONE}", "model.pretrained=false",
                             "model.drop_rate=0.3", "model.drop_path_rate=0.2"]))
    model = create_backbone(cfg.model)
    assert model.drop_rate == 0.3
    drop_paths = [m.drop_prob for m in model.modules() if isinstance(m, timm.layers.DropPath)]
    assert drop_paths and max(drop_paths) > 0
    plain = create_backbone(as_schema(compose(["~experiment", f"model.backbone={BACKBONE}",
                                               "model.pretrained=false"])).model)
    assert not any(isinstance(m, timm.layers.DropPath) for m in plain.modules())
