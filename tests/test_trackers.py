"""Experiment trackers for real: a SQLite MLflow store in tmp_path read back with MlflowClient, an offline W&B
run, several trackers at once, and a resume that continues the same tracker runs."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import tiny_cfg

from transfer_cli.config.compose import compose
from transfer_cli.errors import TransferError
from transfer_cli.resume.plan import plan_resume
from transfer_cli.train import train

PROBE = ("trainer.max_epochs=1", "augmentation=none", "transfer.head_solver=sgd", "optimizer.lr=0.05", "trainer.log_every_n_steps=1")


def test_logger_options_combine_and_each_switches_on_its_own_tracker():
    flags = ("csv", "tensorboard", "mlflow", "wandb")

    def on(*overrides):
        cfg = compose(["~experiment", *overrides])
        return {name for name in flags if cfg.logger[name]}

    assert on() == {"csv"}  # the default: metrics.csv only
    assert on("logger=[csv,mlflow]") == on("logger=mlflow") == {"csv", "mlflow"}
    assert on("logger=[mlflow,wandb]") == {"csv", "mlflow", "wandb"}
    assert on("logger=tensorboard") == {"csv", "tensorboard"}
    assert on("logger=none") == set()
    with pytest.raises(TransferError, match="mlflow"):  # a mistyped option in a list still gets a did-you-mean
        compose(["logger=[csv,mlfow]"])


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory):
    """One MLflow-tracked run (one SQLite store: its first use runs MLflow's migrations) and its resume."""
    pytest.importorskip("mlflow")
    tmp = tmp_path_factory.mktemp("mlflow")
    from conftest import _make_image_folder

    root = _make_image_folder(tmp / "data")
    uri = f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
    first = train(tiny_cfg(tmp, root, *PROBE, "logger=[csv,mlflow]", f"logger.tracking_uri={uri}",
                           "logger.log_model=true", "+logger.tags.team=vision"))
    ids = json.loads((tmp / "run" / "trackers.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    before = {key: [m.step for m in client.get_metric_history(ids["mlflow"]["run_id"], key)]
              for key in ("train/loss_step", "val/acc")}
    resumed = train(plan_resume(str(tmp / "run"), ["trainer.max_epochs=2"]).config)
    return client, ids, first, resumed, before, tmp


def test_mlflow_run_holds_the_config_metrics_and_files(mlflow_run):
    client, ids, first, _, before, tmp = mlflow_run
    run_id = ids["mlflow"]["run_id"]
    assert ids["mlflow"]["tracking_uri"] == f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
    run = client.get_run(run_id)
    assert run.info.run_name == "default/run" and run.data.tags["team"] == "vision"
    assert client.get_experiment(run.info.experiment_id).name == "default"  # the run's `name`
    params = run.data.params
    assert params["optimizer.lr"] == "0.05" and params["model.backbone"] == "test_efficientnet"
    assert params["data.image_size"] == "32" and params["trainer.max_epochs"] == "1"
    steps_per_epoch = first["train_size"] // 4
    assert before["train/loss_step"] == list(range(steps_per_epoch))  # every optimizer step, once
    assert before["val/acc"] == [steps_per_epoch - 1]  # per epoch, at the epoch's last step
    files = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "summary.json", "curves.png", "data_report.json", "class_distribution.png",
            "checkpoints"} <= files
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/best.ckpt"]
    local = client.download_artifacts(run_id, "summary.json", str(tmp / "download"))
    assert json.loads(open(local).read())["name"] == "default"


def test_every_run_starts_with_the_short_data_report(mlflow_run):
    *_, tmp = mlflow_run
    report = json.loads((tmp / "run" / "data_report.json").read_text())
    assert report["per_class"] == {"train": {"cat": 8, "dog": 8}, "val": {"cat": 4, "dog": 4}}
    assert report["imbalance_ratio"] == 1.0 and report["duplicates_across_splits"] == []
    assert "headers" not in report  # the short form opens no image; `transfer data-report` does


def test_resume_continues_the_same_mlflow_run_with_continuous_steps(mlflow_run):
    client, ids, first, resumed, _, tmp = mlflow_run
    run_id = ids["mlflow"]["run_id"]
    assert json.loads((tmp / "run" / "trackers.json").read_text())["mlflow"]["run_id"] == run_id
    experiment = client.get_run(run_id).info.experiment_id
    assert len(client.search_runs([experiment])) == 1  # no second run
    steps_per_epoch = first["train_size"] // 4
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss_step")]
    assert steps == list(range(2 * steps_per_epoch))  # continuous, no gap, no step twice
    assert [m.step for m in client.get_metric_history(run_id, "val/acc")] == [steps_per_epoch - 1,
                                                                             2 * steps_per_epoch - 1]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and resumed["epochs"] == 2
    # MLflow params never change: the original value stays, the resume's is a tag
    assert run.data.params["trainer.max_epochs"] == "1" and run.data.tags["resumed.trainer.max_epochs"] == "2"


def test_resume_refuses_the_logger_group_and_names_the_key(mlflow_run):
    *_, tmp = mlflow_run
    with pytest.raises(TransferError) as err:
        plan_resume(str(tmp / "run"), ["logger=wandb"])
    assert "logger.mlflow=true" in err.value.fix


def _records(path, marker: bytes, seconds: float = 30.0) -> bytes:
    """The offline record file once it holds `marker`: wandb-core, a process of its own, writes it, and on a loaded
    machine its last bytes have been seen to land after finish() returned (only the 7-byte header was there)."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        records = path.read_bytes()
        if marker in records or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


@pytest.mark.slow
def test_wandb_offline_run_and_its_resume_keep_one_run_id(tmp_path, tiny_imagefolder, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train(tiny_cfg(tmp_path, tiny_imagefolder, *PROBE, "logger=[csv,wandb]", "logger.log_model=true"))
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["wandb"]["id"]
    train(plan_resume(str(tmp_path / "run"), ["trainer.max_epochs=2"]).config)
    sessions = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(s.name.endswith(f"-{run_id}") for s in sessions)  # one run, two sessions
    for session in sessions:  # W&B's offline record stream (binary; wandb has no offline reader): what it holds
        records = _records(session / f"run-{run_id}.wandb", b"val/acc")
        assert b"val/acc" in records and b"optimizer.lr" in records  # the metrics and the config as params
        assert f"model-{run_id}".encode() in records  # logger.log_model: the checkpoint as a model artifact
    files = sessions[-1] / "files"
    assert (files / "summary.json").is_file() and (files / "config.yaml").is_file()  # the run's own files
    assert (tmp_path / "run" / "metrics.csv").is_file()  # beside metrics.csv


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_missing_tracker_package_names_the_extra(tracker, tmp_path, monkeypatch):
    from transfer_cli.config.schema import LoggerConfig
    from transfer_cli.tracking.tracker_run import TrackerContext
    from transfer_cli.tracking.trackers import TRACKERS

    monkeypatch.setitem(sys.modules, tracker, None)  # as when the package is not installed: import fails
    with pytest.raises(TransferError) as err:
        TRACKERS[tracker](LoggerConfig(**{tracker: True}), TrackerContext(tmp_path, "x", "x/run"))
    assert f"logger={tracker} needs the {tracker} package" in err.value.message
    assert err.value.fix.startswith(f"pip install 'transfer-cli[{tracker}]'")
