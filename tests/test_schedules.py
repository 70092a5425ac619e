"""Schedules as closed forms (checked against torch's own schedulers where torch has one), plateau's warmup
hand-over, and the optimizer factory keeping the transfer mode's parameter groups intact."""

import io
import math

import pytest
import timm
import torch

from transfer_cli.config.schema import OptimizerConfig, SchedulerConfig, TransferConfig
from transfer_cli.errors import TransferError
from transfer_cli.models.classifier import Classifier
from transfer_cli.training.optim import build_optimizer
from transfer_cli.training.freezing import FreezePlan
from transfer_cli.training.param_groups import param_groups
from transfer_cli.training.schedules import build_plateau, build_scheduler, lr_factor

OPTIMIZERS = ["sgd", "adamw", "adam", "rmsprop", "lamb", "lion"]


def sched(**kw):
    return SchedulerConfig(**kw)


def one_param_optimizer(lr=1.0, groups=1):
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for _ in range(groups)], lr=lr)


def test_onecycle_matches_torch_onecycle():
    total = 37
    cfg = sched(name="onecycle", pct_start=0.3, div_factor=25.0, final_div_factor=1e4)
    optimizer = one_param_optimizer(lr=0.5)
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.5, total_steps=total, pct_start=0.3,
                                                    div_factor=25.0, final_div_factor=1e4, cycle_momentum=False)
    for step in range(total):
        assert 0.5 * lr_factor(step, cfg, 5, total) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12)
        optimizer.step()
        reference.step()


def test_multistep_decays_at_each_milestone_epoch():
    cfg = sched(name="multistep", milestones=[5, 2], gamma=0.5)  # order does not matter
    factors = [lr_factor(epoch * 4, cfg, 4, 40) for epoch in range(8)]
    assert factors == [1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]


def test_warmup_in_steps_and_constant_with_its_old_name():
    cfg = sched(name="constant", warmup_steps=4, warmup_start_factor=0.2)
    assert [lr_factor(s, cfg, 10, 100) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert lr_factor(50, sched(name="none"), 10, 100) == 1.0


@pytest.mark.parametrize("cfg,fix", [
    (dict(name="cosine", warmup_steps=3, warmup_epochs=1.0), "warmup_epochs=0"),
    (dict(name="onecycle", warmup_epochs=1.0), "pct_start"),
])
def test_contradictory_warmups_fail_with_the_fix(cfg, fix):
    with pytest.raises(TransferError) as err:
        build_scheduler(one_param_optimizer(), sched(**cfg), steps_per_epoch=4, total_steps=40)
    assert fix in err.value.fix


def test_plateau_holds_after_warmup_and_decays_on_a_flat_metric():
    cfg = sched(name="plateau", warmup_steps=3, warmup_start_factor=0.0, patience=1, gamma=0.5, min_lr_factor=0.2)
    optimizer = one_param_optimizer(lr=0.1, groups=2)
    optimizer.param_groups[1]["lr"] = 0.01  # a backbone group at a tenth of the head's LR
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    warmup, plateau = build_plateau(optimizer, cfg, steps_per_epoch=3, mode="max")
    lrs = lambda: [g["lr"] for g in optimizer.param_groups]  # noqa: E731
    assert lrs() == [0.0, 0.0]
    plateau.step(0.5)  # an epoch end inside the warmup: ignored
    for _ in range(3):
        optimizer.step()
        warmup.step()
    assert lrs() == pytest.approx([0.1, 0.01])
    seen = []
    for epoch in range(8):  # the metric never improves: decay after patience + 1 flat epochs, down to the floor
        for _ in range(3):
            optimizer.step()
            warmup.step()  # must not undo the decays
        plateau.step(0.5)
        seen.append(lrs()[0])
    assert seen == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.02, 0.02])
    assert lrs()[1] == pytest.approx(0.002)  # each group's own floor
    # Checkpoints hold plain data only.
    buffer = io.BytesIO()
    torch.save({"warmup": warmup.state_dict(), "plateau": plateau.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["plateau"]["num_bad_epochs"] == plateau.num_bad_epochs


@pytest.fixture(scope="module")
def fine_tune_groups():
    def make(opt_cfg):
        model = Classifier(timm.create_model("test_efficientnet", num_classes=0), num_classes=3)
        transfer = TransferConfig(mode="fine_tune", backbone_lr_scale=0.25)
        return param_groups(model, FreezePlan(transfer, model.stages), opt_cfg.lr, opt_cfg.weight_decay)
    return make


@pytest.mark.parametrize("name", OPTIMIZERS + ["timm:radam"])
def test_every_optimizer_keeps_each_groups_lr_and_weight_decay(name, fine_tune_groups):
    timm_opt = name.split(":")[1] if name.startswith("timm:") else None
    opt_cfg = OptimizerConfig(name="adamw" if timm_opt else name, timm_opt=timm_opt, lr=0.02,
                                                   weight_decay=0.03)
    groups = fine_tune_groups(opt_cfg)
    expected = [{k: g[k] for k in ("name", "lr", "lr_scale", "weight_decay")} for g in groups]
    assert len({e["lr"] for e in expected}) == 2 and len({e["weight_decay"] for e in expected}) == 2
    optimizer = build_optimizer(groups, opt_cfg)
    kept = [{k: g[k] for k in ("name", "lr", "lr_scale", "weight_decay")} for g in optimizer.param_groups]
    assert kept == expected
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(g["params"]) for g in groups]


def test_optimizer_classes_and_hyperparameters(fine_tune_groups):
    def build(**kw):
        opt_cfg = OptimizerConfig(**kw)
        return build_optimizer(fine_tune_groups(opt_cfg), opt_cfg)

    assert build(name="sgd", nesterov=True, momentum=0.8).defaults["nesterov"] is True
    plain = build(name="sgd", nesterov=False, momentum=0.8)
    assert plain.defaults["nesterov"] is False and plain.defaults["momentum"] == 0.8
    assert build(name="rmsprop", momentum=0.7).defaults["momentum"] == 0.7
    lion = build(name="lion", betas=[0.9, 0.99])
    assert type(lion).__name__ == "Lion" and tuple(lion.defaults["betas"]) == (0.9, 0.99)
    assert type(build(name="lamb")).__name__ == "Lamb"
    assert build(name="adam", kwargs={"amsgrad": True}).defaults["amsgrad"] is True


def test_unknown_timm_optimizer_suggests_close_names(fine_tune_groups):
    opt_cfg = OptimizerConfig(timm_opt="adamww")
    with pytest.raises(TransferError) as err:
        build_optimizer(fine_tune_groups(opt_cfg), opt_cfg)
    assert "adamw" in err.value.fix


def test_lr_factor_is_finite_everywhere():
    for name in ("cosine", "step", "multistep", "exponential", "onecycle", "plateau", "constant"):
        cfg = sched(name=name, milestones=[1], warmup_epochs=0.0 if name == "onecycle" else 0.5)
        assert all(math.isfinite(lr_factor(s, cfg, 3, 12)) for s in range(13)), name
