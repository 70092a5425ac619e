"""Composition of every config, and config mistakes caught before torch with a did-you-mean."""

import pytest

from transfer_cli.config.compose import check_overrides, compose
from transfer_cli.config.folders import config_dir, config_groups
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


def test_own_data_without_an_experiment_starts_from_the_recipe_of_its_mode():
    """The demo is the default only while the run names no data: fine-tuning a ConvNeXt on your images gets the
    fine-tuning recipe (configs/recipe/fine_tune.yaml), not the demo's linear-probe settings, and its own name."""
    cfg = compose(["data=imagefolder", "data.root=/data/flowers", "model.backbone=convnext_tiny", "transfer=fine_tune"])
    assert cfg.name == "convnext_tiny_fine_tune" and cfg.data.source == "imagefolder"
    assert (cfg.augmentation.name, cfg.augmentation.label_smoothing) == ("light", 0.1)
    assert (cfg.data.batch_size, cfg.optimizer.lr, cfg.scheduler.warmup_epochs) == (32, 1e-3, 1)
    assert cfg.transfer.backbone_lr_scale == 0.1  # configs/transfer/fine_tune.yaml, under the recipe
    # LP-FT with every BatchNorm on the pretrained statistics the probe saw (README: Fine-tuning against the probe)
    assert (cfg.transfer.head_init, cfg.transfer.bn) == ("probe", "eval")
    probe = compose(["data.root=/data/flowers"])  # the default mode, feature_extract: a probe on cached features
    assert probe.name == "resnet50_feature_extract" and probe.augmentation.name == "none"
    assert probe.transfer.head_solver == "auto" and probe.data.test_fraction > 0
    partial = compose(["data=csv", "data.csv=/x.csv", "transfer=partial", "augmentation=medium", "data.batch_size=8"])
    assert (partial.name, partial.augmentation.name, partial.data.batch_size) == ("resnet50_partial", "medium", 8)


def test_a_named_experiment_or_recipe_keeps_its_settings_with_your_data():
    demo = compose(["experiment=demo", "data=imagefolder", "data.root=/data/flowers"])
    assert demo.name == "demo" and demo.data.batch_size == 128 and demo.data.source == "imagefolder"
    bare = compose(["recipe=none", "data.root=/data/flowers", "transfer=fine_tune"])
    assert (bare.name, bare.augmentation.name, bare.scheduler.warmup_epochs) == ("default", "light", 0)
    assert compose(["~experiment", "data.root=/data/flowers"]).name == "default"  # the schema's defaults
    assert compose([]) == compose(["experiment=demo"])


def test_a_sweep_over_transfer_on_your_data_asks_for_the_recipe():
    with pytest.raises(TransferError) as err:
        compose(["data.root=/x", "transfer=feature_extract,fine_tune"])
    assert "recipe=none" in err.value.fix


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


# ---------------------------------------------------------------- one name, one registry, one reader


def registries():
    """Every registry of builders keyed by a name users type, by the config key that chooses it."""
    from transfer_cli.assembly.data import SOURCES
    from transfer_cli.assembly.model import COMPILE_MODES
    from transfer_cli.assembly.probe import HEAD_SOLVERS
    from transfer_cli.data.augment import PRESETS
    from transfer_cli.data.elpv import ELPV_CLASSES
    from transfer_cli.data.samplers import SAMPLERS
    from transfer_cli.config.modes import MODES
    from transfer_cli.training.freezing import NORM_MODES, RULES
    from transfer_cli.training.losses import CRITERIA
    from transfer_cli.training.metrics import TASK_METRICS
    from transfer_cli.training.optim import OPTIMIZERS
    from transfer_cli.training.schedules import SCHEDULES
    from transfer_cli.training.tta import VIEWS
    from transfer_cli.tracking.trackers import TRACKERS
    from transfer_cli.sweeps.tune import PRUNERS
    from transfer_cli.sweeps.tune import SAMPLERS as TUNE_SAMPLERS
    from transfer_cli.training.calibration import CRITERIA as THRESHOLD_CRITERIA

    return [("data.source", SOURCES), ("augmentation.name", PRESETS), ("transfer.mode", MODES), ("transfer.mode", RULES), ("transfer.bn", NORM_MODES),
            ("optimizer.name", OPTIMIZERS), ("scheduler.name", SCHEDULES), ("eval.tta", VIEWS),
            ("data.sampler", SAMPLERS), ("task", CRITERIA), ("task", TASK_METRICS),
            ("data.elpv_task", ELPV_CLASSES), ("trainer.compile", COMPILE_MODES), ("logger", TRACKERS),
            ("tune.sampler", TUNE_SAMPLERS), ("tune.pruner", PRUNERS), ("transfer.head_solver", HEAD_SOLVERS),
            ("calibration.threshold_criterion", THRESHOLD_CRITERIA)]


def test_every_registry_holds_exactly_the_names_its_choice_allows():
    from transfer_cli.config.choices import ALIASES, FLAG_GROUPS, choices

    allowed = choices()
    for key, registry in registries():
        names_off = set(ALIASES.get(key, ())) | set(FLAG_GROUPS.get(key, ()))
        assert sorted(registry) == sorted(set(allowed[key]) - names_off), key


def test_a_flag_group_option_switches_on_its_own_flag():
    """logger=mlflow means logger.mlflow=true, and options combine: logger=[csv,wandb]."""
    from transfer_cli.config.choices import FLAG_GROUPS

    for group, off in FLAG_GROUPS.items():
        flags = [o for o in GROUPS[group] if o not in off]
        for option in flags:
            assert compose([f"{group}={option}"])[group][option] is True, (group, option)
        both = compose([f"{group}=[{flags[0]},{flags[-1]}]"])[group]
        assert both[flags[0]] is True and both[flags[-1]] is True
        for option in off:
            assert not any(compose([f"{group}={option}"])[group][f] for f in flags)


def test_each_transfer_mode_is_one_record_with_its_option_and_its_recipe():
    from transfer_cli.config.modes import MODES

    for name, mode in MODES.items():
        assert compose([f"transfer={name}"]).transfer.mode == name
        assert mode.recipe in GROUPS["recipe"], f"configs/recipe/{mode.recipe}.yaml is missing"
        assert mode.frozen_backbone is (name == "feature_extract")


@pytest.mark.parametrize("key,group", [(k, g) for k, g in
                                       __import__("transfer_cli.config.choices", fromlist=["x"]).GROUP_CHOICES.items()])
def test_a_group_option_sets_its_own_name(key, group):
    """`transfer=partial` means transfer.mode=partial: the YAML file name is the name the registry resolves."""
    from omegaconf import OmegaConf

    for option in GROUPS[group]:
        assert OmegaConf.select(compose(["~experiment", f"{group}={option}"]), key) == option, (group, option)


LIBRARY = ("data", "models", "training", "tracking")  # packages that take plain values, never a config


def test_library_code_never_imports_omegaconf():
    import ast
    from pathlib import Path

    import transfer_cli

    def imports(path):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                yield from (a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                yield node.module

    package = Path(transfer_cli.__file__).parent
    offenders = [str(path.relative_to(package)) for name in LIBRARY for path in (package / name).glob("*.py")
                 if any(m.split(".")[0] in ("omegaconf", "hydra") for m in imports(path))]
    assert offenders == []


def test_every_package_ships_in_the_wheel():
    import tomllib
    from pathlib import Path

    import transfer_cli

    package = Path(transfer_cli.__file__).parent
    found = {"transfer_cli." + ".".join(p.parent.relative_to(package).parts) if p.parent != package
             else "transfer_cli" for p in package.rglob("__init__.py") if "configs" not in p.parts}
    listed = set(tomllib.loads((package.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert found <= listed


# Numeric keys with no range of their own: the seeds (any integer is hashed into the seed of each stream,
# seeding.py), timm's out_indices (negative from the end), and the crop's [low, high] pairs (their own rule).
UNRANGED = ("seed", "data.split_seed", "model.feature_stages", "augmentation.scale", "augmentation.ratio")


def _declared():
    from transfer_cli.config.keys import declared
    from transfer_cli.config.schema import TrainConfig

    return list(declared(TrainConfig))


def test_every_number_declares_its_range():
    """A numeric key added without a range would reach a library unchecked: the schema field must say it."""
    unranged = [dotted for dotted, field, spec in _declared()
                if spec.within is None and dotted not in UNRANGED
                and any(t in str(field.type) for t in ("int", "float")) and "Dict" not in str(field.type)]
    assert unranged == []


def _outside(within):
    if within.low is not None:
        return within.low if within.low_open else within.low - 1
    return within.high if within.high_open else within.high + 1


@pytest.mark.parametrize("dotted", [d for d, _, spec in _declared() if spec.within is not None])
def test_each_declared_range_refuses_a_value_outside_it_and_its_example_passes(dotted):
    """The check walk reads each field's declaration: a value just outside the range is refused naming the key, and
    the value the fix suggests passes every check."""
    from transfer_cli.config.checks import check_values
    from transfer_cli.config.keys import example_of
    from transfer_cli.config.resolve import replace_at
    from transfer_cli.config.schema import TrainConfig

    field, spec = next((f, s) for d, f, s in _declared() if d == dotted)
    listed = "List" in str(field.type)
    # a config where the range applies: the optimizer takes a momentum, a run of whole epochs
    base = replace_at(TrainConfig(), {"optimizer.name": "sgd"})
    bad = _outside(spec.within)
    with pytest.raises(TransferError) as refused:
        check_values(replace_at(base, {dotted: [bad] if listed else bad}))
    assert f"{dotted}{'[0]' if listed else ''}={bad} is out of range" in refused.value.message
    example = example_of(field, spec)
    assert f"{dotted}{'[0]' if listed else ''}={example}" in refused.value.fix
    check_values(replace_at(base, {dotted: [example] if listed else example}))


def test_a_resolved_run_has_its_eval_batch_and_resolving_again_changes_nothing(tmp_path):
    from transfer_cli.config.resolve import resolve_run

    default = resolve_run(compose(["~experiment", "data.batch_size=24", f"paths.output_dir={tmp_path}"]))
    given = resolve_run(compose(["~experiment", "data.batch_size=24", "data.eval_batch_size=7",
                                 f"paths.output_dir={tmp_path}"]))
    assert (default.data.eval_batch_size, given.data.eval_batch_size) == (48, 7)
    assert resolve_run(default) == default and resolve_run(given) == given
