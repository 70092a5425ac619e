"""Every documented combination works: each option of each config group composes and passes the value checks under
every recipe and every experiment, trains a batch, and what a recipe trained evaluates, predicts and exports.
Option YAMLs hold only what differs from the schema, so a default lives in the schema alone."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import yaml
from conftest import _make_image_folder, tiny_run_overrides

from transfer_cli.config.choices import GROUP_CHOICES
from transfer_cli.config.compose import as_schema, compose
from transfer_cli.config.folders import config_dir, config_groups
from transfer_cli.config.schema import TrainConfig
from transfer_cli.errors import TransferError

BUNDLES = ("recipe", "experiment", "hparams_search", "hydra", "debug")  # @package _global_, or Hydra's own
GROUPS = {g: opts for g, opts in config_groups().items() if g not in BUNDLES}
RECIPES = config_groups()["recipe"]
EXPERIMENTS = config_groups()["experiment"]
OWN_DATA = ("data=imagefolder", "data.root=/nonexistent/images")


def _defaults(cls: type) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = _defaults(type(value)) if dataclasses.is_dataclass(value) else value
    return out


def _leaves(node: dict, prefix: str):
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_no_option_restates_a_schema_default():
    """A restated default would silently keep the old value when the schema's default changes. The one exception
    is the key that names the option itself (augmentation.name: light is what makes light.yaml light)."""
    defaults = _defaults(TrainConfig)
    restated = []
    for group, options in GROUPS.items():
        for option in options:
            body = yaml.safe_load((config_dir() / group / f"{option}.yaml").read_text()) or {}
            body.pop("defaults", None)
            for key, value in _leaves(body, f"{group}."):
                node = defaults
                for part in key.split("."):
                    node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
                same = node == value and type(node) is type(value) or (
                    isinstance(node, float) and isinstance(value, int) and not isinstance(value, bool) and node == value)
                if same and key not in GROUP_CHOICES:
                    restated.append(f"{group}/{option}.yaml: {key}: {value!r}")
    assert not restated, "option YAMLs restate schema defaults:\n" + "\n".join(restated)


def _bundles_with_linear_warmup() -> list[list[str]]:
    out = []
    for recipe in RECIPES:
        out.append([*OWN_DATA, f"recipe={recipe}"])
    for experiment in EXPERIMENTS:
        out.append([f"experiment={experiment}"])
    return [b for b in out if as_schema(compose(b)).scheduler.warmup_epochs]


@pytest.mark.parametrize("bundle", _bundles_with_linear_warmup(), ids=" ".join)
def test_a_scheduler_chosen_over_a_bundle_drops_the_warmup_only_its_own_scheduler_took(bundle):
    stated = as_schema(compose(bundle)).scheduler
    assert stated.name == "cosine" and stated.warmup_epochs > 0
    onecycle = as_schema(compose([*bundle, "scheduler=onecycle"])).scheduler
    assert (onecycle.name, onecycle.warmup_epochs, onecycle.warmup_steps) == ("onecycle", 0, 0)
    step = as_schema(compose([*bundle, "scheduler=step"])).scheduler  # a linear warmup still serves step decay
    assert step.warmup_epochs == stated.warmup_epochs


def test_a_warmup_the_user_asks_for_under_onecycle_is_refused_before_torch():
    with pytest.raises(TransferError, match="has its own warmup"):
        as_schema(compose([*OWN_DATA, "transfer=fine_tune", "scheduler=onecycle", "scheduler.warmup_epochs=2"]))


def _option_overrides(group: str, option: str) -> list[str]:
    extra = {("data", "csv"): ["data.csv=/nonexistent/labels.csv"]}
    return [f"{group}={option}", *extra.get((group, option), [])]


@pytest.mark.slow
def test_every_option_composes_and_checks_under_every_recipe_and_experiment():
    tried = 0
    for recipe in RECIPES:
        for group, options in GROUPS.items():
            for option in options:
                cfg = as_schema(compose([*OWN_DATA, f"recipe={recipe}", *_option_overrides(group, option)]))
                assert getattr(cfg, group) is not None
                tried += 1
    for experiment in EXPERIMENTS:  # the groups whose options meet an experiment's own values
        for group in ("transfer", "optimizer", "scheduler"):
            for option in GROUPS[group]:
                as_schema(compose([f"experiment={experiment}", f"{group}={option}"]))
                tried += 1
    assert tried == len(RECIPES) * sum(map(len, GROUPS.values())) + len(EXPERIMENTS) * sum(
        len(GROUPS[g]) for g in ("transfer", "optimizer", "scheduler"))


# ------------------------------------------------------------------------------------------ one batch each

# The options a CPU-only test machine cannot run, and what it says instead (an error and its fix, no traceback).
CANNOT_RUN_HERE = {("trainer", "gpu"): "GPU", ("trainer", "ddp"): None, ("logger", "tensorboard"): "tensorboard",
                   ("model", "efficientnet_lite0_offline"): None, ("data", "elpv"): None, ("data", "csv"): None}


def _one_batch_cases():
    cases = []
    for group, options in GROUPS.items():
        for option in options:
            if CANNOT_RUN_HERE.get((group, option), "") is None:
                continue  # elsewhere: tests/test_ddp.py, test_offline_weights.py, test_data.py (ELPV, CSV)
            recipe = f"recipe={option}" if group == "transfer" else "recipe=fine_tune"
            cases.append((group, option, recipe))
    return cases


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _make_image_folder(tmp_path_factory.mktemp("combos") / "data", per_class=4)


@pytest.mark.slow
@pytest.mark.parametrize("group,option,recipe", _one_batch_cases(), ids=lambda v: str(v))
def test_every_option_trains_a_batch_or_says_why_not(tmp_path, images, group, option, recipe):
    from transfer_cli.train import train

    overrides = tiny_run_overrides(images, tmp_path / "run", recipe, *_option_overrides(group, option),
                                   "trainer.fast_dev_run=true", f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db")
    overrides.remove("~experiment")  # the recipe replaces the demo (config/compose.py own_data_defaults)
    if group == "trainer":  # the option is the point here; tiny_run_overrides' trainer=cpu would replace it
        overrides.remove("trainer=cpu")
    reason = CANNOT_RUN_HERE.get((group, option))
    if reason is not None:
        import importlib.util

        import torch

        available = torch.cuda.is_available() if reason == "GPU" else importlib.util.find_spec(reason) is not None
        if not available:
            with pytest.raises(TransferError, match=reason):
                train(compose(overrides))
            return
    summary = train(compose(overrides))
    assert summary["epochs"] >= 0 and summary["run_dir"] == str(tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_what_each_recipe_trains_evaluates_predicts_and_exports(tmp_path, images, recipe):
    from transfer_cli.commands.evaluate import evaluate
    from transfer_cli.commands.export import export
    from transfer_cli.commands.predict import predict
    from transfer_cli.train import train

    overrides = tiny_run_overrides(images, tmp_path / "run", f"recipe={recipe}", "trainer.max_epochs=1",
                                   "trainer.limit_train_batches=1", "trainer.limit_val_batches=1")
    overrides.remove("~experiment")
    summary = train(compose(overrides))
    run_dir = Path(summary["run_dir"])
    report = evaluate(run_dir, split="val", output=tmp_path / "eval")
    assert report["num_images"] == sum(1 for _ in (images / "val").rglob("*.png"))
    assert 0.0 <= report["metrics"]["acc"] <= 1.0
    rows = predict(run_dir, images / "val", tmp_path / "predictions.csv").rows
    with open(tmp_path / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows) == report["num_images"]
    outputs = {"onnx": tmp_path / "model.onnx", "torchscript": tmp_path / "model.pt", "timm": tmp_path / "timm"}
    for format, output in outputs.items():
        result = export(run_dir, format=format, output=output)
        assert result.path.exists() and result.metadata["class_names"] == list(summary["class_names"]), format
