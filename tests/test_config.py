"""Composition of every config, and config mistakes caught before torch with a did-you-mean."""

import pytest

from transfer_cli.config.compose import check_overrides, compose, config_dir, config_groups
from transfer_cli.errors import TransferError

GROUPS = config_groups()


@pytest.mark.parametrize("experiment", GROUPS["experiment"])
def test_every_experiment_composes(experiment):
    cfg = compose([f"experiment={experiment}"])
    assert cfg.name == experiment


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g, opts in GROUPS.items() if g not in ("hydra", "experiment") for o in opts],
)
def test_every_group_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    assert cfg is not None


def test_default_is_the_demo():
    cfg = compose([])
    assert cfg.name == "demo"
    assert cfg.data.source == "elpv"
    assert cfg.model.backbone == "tf_efficientnet_lite0" and cfg.model.weights == "efficientnet_lite0_pypi"
    assert cfg.transfer.mode == "feature_extract"


def test_overrides_reach_the_config():
    cfg = compose(["model.backbone=convnext_tiny", "transfer=fine_tune", "optimizer.lr=3e-4",
                   "trainer=gpu", "trainer.precision=bf16-mixed"])
    assert (cfg.model.backbone, cfg.transfer.mode, cfg.optimizer.lr) == ("convnext_tiny", "fine_tune", 3e-4)
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", "bf16-mixed")


@pytest.mark.parametrize(
    "override,expected",
    [
        ("model.backbon=resnet18", "model.backbone"),
        ("optimizer.learning_rate=0.1", "the keys of optimizer are"),
        ("trainr.max_epochs=3", "trainer"),
        ("data.batchsize=8", "data.batch_size"),
    ],
)
def test_mistyped_key_says_did_you_mean(override, expected):
    with pytest.raises(TransferError) as err:
        check_overrides([override])
    assert expected in str(err.value)


def test_unknown_group_option_lists_close_matches():
    with pytest.raises(TransferError) as err:
        check_overrides(["transfer=fine_tun"])
    assert "fine_tune" in str(err.value)
    with pytest.raises(TransferError) as err:
        check_overrides(["experiment=resnet50_finetun,demo"])  # sweep values are checked one by one
    assert "resnet50_finetune" in str(err.value)


def test_hydra_flags_and_free_form_keys_pass():
    check_overrides(["-m", "--cfg", "job", "hydra.run.dir=/tmp/x", "+trainer.kwargs.detect_anomaly=true",
                     "optimizer.lr=1e-3,3e-4", "~experiment"])


def test_null_group_points_to_the_delete_syntax():
    with pytest.raises(TransferError) as err:
        check_overrides(["experiment=null"])
    assert "~experiment" in str(err.value)


def test_wrong_type_fails_at_compose():
    with pytest.raises(TransferError) as err:
        compose(["trainer.max_epochs=many"])
    assert "max_epochs" in str(err.value)


def test_invalid_choice_says_did_you_mean():
    with pytest.raises(TransferError) as err:
        compose(["transfer.mode=finetune"])
    assert "fine_tune" in str(err.value)


def test_configs_ship_with_the_package():
    root = config_dir()
    assert (root / "train.yaml").is_file()
    assert {"data", "model", "transfer", "augmentation", "optimizer", "scheduler", "trainer", "logger",
            "callbacks", "experiment", "debug", "hydra"} <= set(GROUPS)
