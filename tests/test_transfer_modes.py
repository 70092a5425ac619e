"""Transfer modes on tiny models: exactly the configured parameters move, at exactly the configured LRs."""

import json
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback
from conftest import tiny_cfg
from test_train import BACKBONE, TWO_EPOCHS

from transfer_cli.config.compose import as_schema, compose
from transfer_cli.config.schema import OptimizerConfig, TransferConfig
from transfer_cli.errors import TransferError
from transfer_cli.models.classifier import Classifier
from transfer_cli.models.stages import backbone_stages
from transfer_cli.assembly.run import build_run
from transfer_cli.training.audit import check_consistency
from transfer_cli.training.freezing import FreezePlan, apply_freeze, trainable_params
from transfer_cli.training.optim import build_optimizer
from transfer_cli.training.param_groups import param_groups
from transfer_cli.training.schedules import lr_factor


def transfer(**kw):
    return TransferConfig(**kw)


class Snapshots(Callback):
    """The backbone's tensors (weights and BatchNorm buffers) at fit start and after every training epoch."""

    def __init__(self):
        self.states = []

    def _take(self, module):
        self.states.append({k: v.detach().clone() for k, v in module.model.backbone.state_dict().items()})

    def on_fit_start(self, trainer, module):
        self._take(module)

    def on_train_epoch_end(self, trainer, module):
        self._take(module)


def fit_with_snapshots(cfg):
    run = build_run(cfg, Path(cfg.paths.output_dir))
    snaps = Snapshots()
    run.trainer.callbacks.append(snaps)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return run, snaps.states


def moved(before, after, stage):
    """Names of a stage's tensors (parameters and the buffers of their modules) that changed."""
    owners = {p.rpartition(".")[0] for p in stage.params}
    names = [k for k in before if k.rpartition(".")[0] in owners]
    return {k for k in names if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("name,expected", [
    ("tf_efficientnet_lite0", ["stem"] + [f"stage{i}" for i in range(1, 8)]),
    ("resnet18", ["stem", "stage1", "stage2", "stage3", "stage4"]),
    ("convnext_atto", ["stem", "stage1", "stage2", "stage3", "stage4"]),
    ("test_vit", ["stem"] + [f"stage{i}" for i in range(1, 7)]),
])
def test_stages_come_from_the_backbones_own_grouping(name, expected):
    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    stages = backbone_stages(backbone)
    assert [s.name for s in stages] == expected
    every = [n for n, _ in backbone.named_parameters()]
    assert sorted(p for s in stages for p in s.params) == sorted(every)  # each parameter in exactly one stage
    assert [s.depth for s in stages] == list(range(len(stages), 0, -1))


def test_partial_two_stages_of_an_efficientnet_freezes_stem_and_first_two_blocks():
    backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    stages = backbone_stages(backbone)
    trainable = trainable_params(transfer(mode="partial", freeze_stages=2), stages, epoch=0)
    frozen = {n for n, _ in backbone.named_parameters()} - trainable
    prefixes = {n.split(".")[0] if not n.startswith("blocks") else ".".join(n.split(".")[:2]) for n in frozen}
    assert prefixes == {"conv_stem", "bn1", "blocks.0", "blocks.1"}


def test_partial_moves_exactly_the_unfrozen_stages(tmp_path, tiny_imagefolder):
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *TWO_EPOCHS, "transfer=partial", "transfer.freeze_stages=2",
                   "transfer.freeze=[conv_head]", "augmentation=none", "optimizer.lr=0.05")
    run, states = fit_with_snapshots(cfg)
    stages = {s.name: s for s in run.model.stages}
    first, last = states[0], states[-1]
    for name in ("stem", "stage1", "stage2"):
        assert not moved(first, last, stages[name]), f"frozen {name} moved (weights or BN statistics)"
    assert torch.equal(first["conv_head.weight"], last["conv_head.weight"]), "regex-frozen conv_head moved"
    for name in ("stage3", "stage4", "stage5"):
        assert moved(first, last, stages[name]), f"{name} should train"
    audit = json.loads((tmp_path / "run" / "audit.json").read_text())["checks"][0]["stages"]
    rows = {r["stage"]: r for r in audit}
    assert rows["stem"]["trainable"] == 0 and rows["stage3"]["frozen"] == 0 and rows["stage5"]["frozen"] > 0
    assert rows["stage1"]["bn"] == "eval" and rows["stage3"]["bn"] == "train"


def test_gradual_unfreeze_moves_a_stage_only_after_its_milestone(tmp_path, tiny_imagefolder):
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *TWO_EPOCHS, "transfer=gradual_unfreeze", "transfer.unfreeze={0:head,1:[stage-1],2:all}",
                   "transfer.layer_decay=null", "augmentation=none", "trainer.max_epochs=3", "optimizer.lr=0.05")
    run, states = fit_with_snapshots(cfg)
    stages = run.model.stages
    last_stage, earlier = stages[-1], stages[:-1]
    assert all(not moved(states[0], states[1], s) for s in stages), "epoch 0 trains the head alone"
    assert moved(states[1], states[2], last_stage), "epoch 1 thaws the last stage"
    assert all(not moved(states[1], states[2], s) for s in earlier), "earlier stages move before their milestone"
    assert all(moved(states[2], states[3], s) for s in stages if s.params), "epoch 2 thaws everything"
    checks = json.loads((tmp_path / "run" / "audit.json").read_text())["checks"]
    assert [c["epoch"] for c in checks] == [0, 1, 2]  # re-checked at every milestone
    # The optimizer held every stage's group from the start; its shape never changed.
    names = {g["name"] for g in run.trainer.optimizers[0].param_groups}
    assert {f"backbone.{s.name}/decay" for s in stages if s.params} <= names


def test_layer_decay_with_partial_freezing_gives_each_stage_its_scale(tmp_path, tiny_imagefolder):
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *TWO_EPOCHS, "transfer=partial", "transfer.freeze_stages=2",
                   "transfer.layer_decay=0.5", "transfer.backbone_lr_scale=0.8", "optimizer.lr=0.01",
                   "scheduler=cosine", "scheduler.warmup_epochs=1", "trainer.max_epochs=2")
    run, _ = fit_with_snapshots(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    steps = ckpt["global_step"]
    factor = lr_factor(steps, cfg.scheduler, steps / 2, steps)
    depth = {s.name: s.depth for s in run.model.stages}  # test_efficientnet: stem 6, stage1 5 ... stage5 1
    groups = ckpt["optimizer_states"][0]["param_groups"]
    seen = set()
    for g in groups:
        part = g["name"].split("/")[0]
        if part == "head":
            scale = 1.0
        else:
            stage = part.removeprefix("backbone.")
            seen.add(stage)
            scale = 0.8 * 0.5 ** depth[stage]  # counted over the whole backbone, frozen stages included
        assert g["lr"] == pytest.approx(0.01 * scale * factor, rel=1e-9, abs=1e-15), g["name"]
    assert seen == {"stage3", "stage4", "stage5"}  # frozen stages get no group
    rows = {r["stage"]: r for r in json.loads((tmp_path / "run" / "audit.json").read_text())["checks"][0]["stages"]}
    for stage in ("stage3", "stage4", "stage5"):  # the audit shows each stage's base LR, before the schedule
        assert rows[stage]["lr"] == [pytest.approx(0.01 * 0.8 * 0.5 ** depth[stage], rel=1e-12)]
    assert rows["stem"]["lr"] == [] and rows["head"]["lr"] == [pytest.approx(0.01)]


def test_bn_train_policy_updates_statistics_of_frozen_stages_only(tmp_path, tiny_imagefolder):
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *TWO_EPOCHS, "transfer=partial", "transfer.freeze_stages=2", "transfer.bn=train",
                   "augmentation=none", "trainer.max_epochs=1")
    run, states = fit_with_snapshots(cfg)
    stem = run.model.stages[0]
    changed = moved(states[0], states[-1], stem)
    assert changed and all("running" in k or "num_batches" in k for k in changed)


def test_bn_eval_keeps_every_running_statistic_while_the_whole_network_trains(tmp_path, tiny_imagefolder):
    """transfer.bn=eval: each BatchNorm normalizes with the pretrained statistics, so a probe fitted on eval-mode
    features fits the network that fine-tunes (LP-FT); the norms' own weights still train."""
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *TWO_EPOCHS, "transfer=fine_tune", "transfer.bn=eval",
                   "augmentation=none", "trainer.max_epochs=1")
    run, states = fit_with_snapshots(cfg)
    before, after = states[0], states[-1]
    statistics = [k for k in before if "running_" in k]
    assert statistics and all(torch.equal(before[k], after[k]) for k in statistics)
    norm_weights = [k for k in before if k.rpartition(".")[0] + ".running_mean" in before and k.endswith(".weight")]
    assert norm_weights and any(not torch.equal(before[k], after[k]) for k in norm_weights)
    run.model.train()
    norms = [m for m in run.model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)


def tiny_model_and_optimizer(mode, **kw):
    model = Classifier(timm.create_model(BACKBONE, num_classes=0), num_classes=3)
    cfg = transfer(mode=mode, **kw)
    trainable = apply_freeze(model, cfg, epoch=0)
    optimizer = build_optimizer(param_groups(model, FreezePlan(cfg, model.stages), 1e-3, 0.05),
                                OptimizerConfig())
    return model, optimizer, trainable


def test_audit_passes_a_consistent_setup_and_names_a_planted_mismatch():
    model, optimizer, trainable = tiny_model_and_optimizer("partial", freeze_stages=2)
    check_consistency(model, optimizer, trainable)
    model.backbone.conv_stem.weight.requires_grad_(True)  # thawed behind the config's back
    with pytest.raises(TransferError) as err:
        check_consistency(model, optimizer, trainable)
    assert "backbone.conv_stem.weight" in str(err.value) and "no optimizer group" in str(err.value)


def test_audit_names_a_trainable_parameter_missing_from_the_optimizer():
    model, optimizer, trainable = tiny_model_and_optimizer("fine_tune")
    optimizer.param_groups = [g for g in optimizer.param_groups if g["name"] != "head/no_decay"]
    with pytest.raises(TransferError) as err:
        check_consistency(model, optimizer, trainable)
    assert "head.layers.0.bias" in str(err.value)


def test_unknown_stage_in_a_milestone_suggests_the_real_ones():
    model = Classifier(timm.create_model(BACKBONE, num_classes=0), num_classes=3)
    with pytest.raises(TransferError) as err:
        apply_freeze(model, transfer(mode="gradual_unfreeze", unfreeze={0: "head", 2: ["stage9"]}), epoch=3)
    assert "stage9" in str(err.value) and "stage5" in str(err.value)


def test_milestones_compose_from_the_command_line():
    cfg = compose(["transfer=gradual_unfreeze", "transfer.unfreeze={0:head,3:{stages:[stage-2],lr_scale:0.5}}"])
    assert OmegaConf.to_container(cfg.transfer.unfreeze) == {0: "head", 3: {"stages": ["stage-2"], "lr_scale": 0.5}}


def test_feature_combination_concatenates_backbones_and_stages(tmp_path, tiny_imagefolder):
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *TWO_EPOCHS, "model.backbones=[test_efficientnet,test_resnet]",
                   "model.feature_stages=[-1,-2]", "transfer=feature_extract", "augmentation=none",
                   "trainer.max_epochs=2", "optimizer.lr=0.05")
    run, states = fit_with_snapshots(cfg)
    members = [timm.create_model(n, num_classes=0) for n in ("test_efficientnet", "test_resnet")]
    width = sum(m.feature_info[-1]["num_chs"] + m.feature_info[-2]["num_chs"] for m in members)
    assert run.model.num_features == width and run.model.head.layers[-1].in_features == width
    assert all(torch.equal(states[0][k], states[-1][k]) for k in states[0]), "the combined backbones are frozen"
    names = [s.name for s in run.model.stages]
    assert names[0] == "m0.stem" and "m1.stage4" in names
    # Each backbone normalizes with its own statistics; the pipeline only scales pixels to [0, 1].
    assert run.images.data_config["mean"] == (0.0, 0.0, 0.0)
    assert len(run.images.data_config["member_norms"]) == 2
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["transfer"]["backbone"] == ["test_efficientnet", "test_resnet"]


def test_feature_combination_can_fine_tune_one_stage_of_each_backbone(tmp_path, tiny_imagefolder):
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *TWO_EPOCHS, "model.backbones=[test_efficientnet,test_resnet]",
                   "transfer=gradual_unfreeze", "transfer.unfreeze={0:head,1:[stage-1]}", "augmentation=none",
                   "trainer.max_epochs=2", "optimizer.lr=0.05")
    run, states = fit_with_snapshots(cfg)
    stages = {s.name: s for s in run.model.stages}
    assert moved(states[1], states[2], stages["m0.stage5"]) and moved(states[1], states[2], stages["m1.stage4"])
    assert not moved(states[0], states[2], stages["m0.stage4"]) and not moved(states[0], states[2], stages["m1.stem"])


def test_default_gradual_schedule_thaws_one_stage_from_the_top_per_epoch():
    backbone = timm.create_model(BACKBONE, num_classes=0)
    stages = backbone_stages(backbone)  # stem, stage1 .. stage5
    cfg = as_schema(compose(["transfer=gradual_unfreeze", "transfer.unfreeze_every=2"])).transfer
    by_stage = {s.name: set(s.params) for s in stages}
    assert trainable_params(cfg, stages, 0) == set() and trainable_params(cfg, stages, 1) == set()
    assert trainable_params(cfg, stages, 2) == by_stage["stage5"]
    assert trainable_params(cfg, stages, 5) == by_stage["stage5"] | by_stage["stage4"]
    assert trainable_params(cfg, stages, 12) == {p for s in stages for p in s.params}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["elpv_gradual_unfreeze", "elpv_feature_combination"])
def test_elpv_transfer_experiments_run_on_the_offline_weights(tmp_path, experiment):
    cfg = compose([f"experiment={experiment}", "debug=fast_dev_run", "model.pretrained=false", "trainer=cpu",
                   "data.batch_size=4", "data.num_workers=0", "data.image_size=96", "transfer.cache_features=false",
                   "callbacks.rich_progress=false", f"paths.output_dir={tmp_path / 'run'}"])
    run, states = fit_with_snapshots(cfg)
    checks = json.loads((tmp_path / "run" / "audit.json").read_text())["checks"]
    assert checks[0]["stages"][-1]["stage"] == "head" and checks[0]["stages"][-1]["trainable"] > 0
    assert sum(r["frozen"] for r in checks[0]["stages"]) > 1_000_000  # the ImageNet backbone is frozen in epoch 0
