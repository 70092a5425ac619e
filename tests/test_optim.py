"""The LR schedule is a closed-form function of the step; parameter groups follow the transfer mode."""

import math

import pytest
import timm
import torch

from transfer_cli.config.schema import OptimizerConfig, SchedulerConfig, TransferConfig
from transfer_cli.models.classifier import Classifier
from transfer_cli.training.optim import build_optimizer
from transfer_cli.training.freezing import FreezePlan
from transfer_cli.training.param_groups import param_groups
from transfer_cli.training.schedules import build_scheduler, lr_factor


def sched(**kw):
    return SchedulerConfig(**kw)


def test_cosine_with_linear_warmup_matches_closed_form():
    cfg = sched(name="cosine", warmup_epochs=2, warmup_start_factor=0.1, min_lr_factor=0.05)
    spe, total = 10, 100
    for step in range(total + 1):
        if step < 20:
            expected = 0.1 + 0.9 * step / 20
        else:
            expected = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - 20) / 80))
        assert lr_factor(step, cfg, spe, total) == pytest.approx(expected, abs=1e-12)


def test_step_exponential_and_constant():
    assert [lr_factor(s, sched(name="step", step_epochs=2, gamma=0.5), 5, 50) for s in (0, 9, 10, 20)] == [
        1.0, 1.0, 0.5, 0.25]
    assert lr_factor(15, sched(name="exponential", gamma=0.9), 5, 50) == pytest.approx(0.9**3)
    assert lr_factor(15, sched(name="none"), 5, 50) == 1.0


def test_scheduler_drives_every_group_from_the_step():
    model = Classifier(timm.create_model("test_efficientnet", num_classes=0), num_classes=3)
    transfer = TransferConfig(mode="fine_tune", backbone_lr_scale=0.25)
    opt_cfg = OptimizerConfig(name="sgd", lr=0.1, weight_decay=1e-4)
    groups = param_groups(model, FreezePlan(transfer, model.stages), opt_cfg.lr, opt_cfg.weight_decay)
    optimizer = build_optimizer(groups, opt_cfg)
    cfg = sched(name="cosine", warmup_epochs=1)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=4, total_steps=12)
    for step in range(1, 12):
        optimizer.step()
        scheduler.step()
        for group in optimizer.param_groups:
            expected = 0.1 * group["lr_scale"] * lr_factor(step, cfg, 4, 12)
            assert group["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    scales = {g["name"]: g["lr_scale"] for g in optimizer.param_groups}
    assert all(scale == (1.0 if name.startswith("head/") else 0.25) for name, scale in scales.items())
    assert {"backbone.stem/decay", "backbone.stage5/no_decay", "head/decay", "head/no_decay"} <= set(scales)


def test_no_weight_decay_on_biases_and_norms():
    model = Classifier(timm.create_model("test_efficientnet", num_classes=0), num_classes=3)
    transfer = TransferConfig(mode="fine_tune")
    groups = param_groups(model, FreezePlan(transfer, model.stages), 1e-3, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            is_1d = p.ndim <= 1
            assert (group["weight_decay"] == 0.0) == is_1d, names[id(p)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_feature_extract_optimizes_only_the_head():
    model = Classifier(timm.create_model("test_efficientnet", num_classes=0), num_classes=3)
    transfer = TransferConfig(mode="feature_extract")
    groups = param_groups(model, FreezePlan(transfer, model.stages), 1e-3, 0.05)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.head.parameters()}
    assert torch.is_tensor(groups[0]["params"][0])
