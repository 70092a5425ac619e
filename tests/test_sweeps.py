"""Sweeps as a user runs them: `transfer train -m` subprocesses on tiny data, the summary files, Optuna studies."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_run_overrides

from transfer_cli.cli import main
from transfer_cli.errors import TransferError
from transfer_cli.sweeps.summary import build_summary


def tiny_args(root):
    return tiny_run_overrides(root, None, "trainer.max_epochs=1")


def transfer(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "transfer_cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def summary_rows(sweep_dir):
    with open(sweep_dir / "sweep_summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_imagefolder):
    sweep = tmp_path / "sweep"
    # A negative momentum is out of range for SGD; AdamW has no momentum: exactly one of the four combinations fails.
    out = transfer("train", "-m", *tiny_args(tiny_imagefolder), "optimizer=sgd,adamw",
                   "optimizer.momentum=0.9,-1.0", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]  # the sweep finished, but not every job did
    assert "1 of 4 sweep jobs failed" in " ".join(out.stderr.split())
    rows = summary_rows(sweep)
    assert len(rows) == 4
    assert sorted(r["status"] for r in rows) == ["failed", "ok", "ok", "ok"]
    failed = next(r for r in rows if r["status"] == "failed")
    assert "optimizer=sgd" in failed["overrides"] and "optimizer.momentum=-1.0" in failed["overrides"]
    assert "momentum" in failed["error"] and failed["val/acc"] == ""
    assert rows[-1] is failed  # ranked jobs first, those without a value last
    for row in rows[:3]:
        assert 0.0 <= float(row["val/acc"]) <= 1.0 and row["epochs"] == "1" and float(row["wall_time_s"]) > 0
        assert (tmp_path / row["run_dir"] / "checkpoints" / "last.ckpt").is_file()
    values = [float(r["val/acc"]) for r in rows[:3]]
    assert values == sorted(values, reverse=True)
    best = rows[0]["overrides"].split()
    assert "transfer train" in out.stdout and all(o in out.stdout.replace("\n", " ") for o in best[-2:])
    md = (sweep / "sweep_summary.md").read_text()
    assert "3 ok, 1 failed" in md and "optimizer.momentum=-1.0 is out of range" in md
    assert (sweep / "sweep_summary.png").stat().st_size > 10_000

    # An interrupted sweep: one job never wrote its record, the summary files are gone. The command rebuilds them.
    interrupted = rows[1]["run_dir"]
    os.remove(os.path.join(interrupted, "job.json"))
    for name in ("sweep_summary.csv", "sweep_summary.md", "sweep_summary.png"):
        (sweep / name).unlink()
    main(["sweep-summary", str(sweep)])
    rebuilt = summary_rows(sweep)
    assert sorted(r["status"] for r in rebuilt) == ["failed", "interrupted", "ok", "ok"]
    again = next(r for r in rebuilt if r["run_dir"] == interrupted)
    assert again["val/acc"] == rows[1]["val/acc"]  # still read from the run's metrics.csv
    assert (sweep / "sweep_summary.png").is_file() and (sweep / "sweep_summary.md").is_file()


def write_record(job_dir, overrides, status, best, monitor="val/loss"):
    job_dir.mkdir(parents=True)
    record = {"job": job_dir.name, "overrides": overrides, "status": status, "monitor": monitor, "mode": "min",
              "best": best, "epochs": 3 if best is not None else None, "wall_time_s": 1.0,
              "run_dir": str(job_dir), "error": "" if status == "ok" else "RuntimeError: boom", "extra": {}}
    (job_dir / "job.json").write_text(json.dumps(record))


def test_summary_ranks_by_the_monitor_direction_and_prints_the_best_command(tmp_path, capsys):
    write_record(tmp_path / "0", ["optimizer.lr=0.1", "seed=1"], "ok", 0.9)
    write_record(tmp_path / "1", ["optimizer.lr=0.01", "seed=1"], "ok", 0.3)
    write_record(tmp_path / "2", ["optimizer.lr=0.001", "seed=1"], "failed", None)
    write_record(tmp_path / "10", ["optimizer.lr=1e-4", "seed=1"], "ok", 0.5)
    summary = build_summary(tmp_path, monitor="val/loss", mode="min")
    assert [r.job for r in summary.records] == ["1", "10", "0", "2"]
    assert summary.swept == ["optimizer.lr"]  # seed is the same everywhere
    assert summary.best_command == "transfer train optimizer.lr=0.01 seed=1"
    printed = capsys.readouterr().out
    assert "transfer train optimizer.lr=0.01 seed=1" in printed and "boom" in printed
    assert "lower is better" in (tmp_path / "sweep_summary.md").read_text()


def test_sweep_summary_of_a_dir_without_jobs_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sweep-summary", str(tmp_path)])
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "holds no sweep jobs" in err and "fix:" in err


def test_missing_plugin_names_the_extra_to_install(tmp_path):
    # The environment without the plugin: its module resolves to nothing, as when it is not installed.
    probe = ("import sys; sys.modules['hydra_plugins.hydra_submitit_launcher'] = None\n"
             "from transfer_cli.cli import main; main(sys.argv[1:])")
    out = subprocess.run([sys.executable, "-c", probe, "train", "-m", "hydra/launcher=slurm"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2
    assert "pip install 'transfer-cli[slurm]'" in " ".join(out.stderr.split()) and "Traceback" not in out.stderr


def test_slurm_launcher_and_ddp_trainer_compose(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from transfer_cli.config.folders import config_dir
    from transfer_cli.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.timeout_min == 240
    assert cfg.trainer.strategy == "ddp"


def optuna_trials(db, study_name="default"):
    import optuna

    return optuna.load_study(study_name=study_name, storage=f"sqlite:///{db}").trials


def states(trials):
    return [t.state.name for t in trials]


def test_search_space_grammar_maps_to_optuna_distributions():
    optuna = pytest.importorskip("optuna", minversion="4")
    from transfer_cli.sweeps.tune import distribution

    d = optuna.distributions
    assert distribution("optimizer.lr", "tag(log, interval(1e-4, 3e-2))") == d.FloatDistribution(1e-4, 3e-2, log=True)
    assert distribution("x", "int(interval(1, 8))") == d.IntDistribution(1, 8)
    assert distribution("x", "interval(1, 8)") == d.FloatDistribution(1.0, 8.0)  # Hydra's interval is a float one
    assert distribution("x", "range(2, 10, 2)") == d.IntDistribution(2, 8, step=2)
    assert distribution("model.head_hidden_dim", "choice(0, 256)") == d.CategoricalDistribution([0, 256])
    assert distribution("optimizer", "adamw,sgd") == d.CategoricalDistribution(["adamw", "sgd"])
    with pytest.raises(TransferError, match="single value"):
        distribution("optimizer.lr", "0.1")


def test_tune_without_optuna_names_the_extra(monkeypatch):
    from transfer_cli.sweeps.tune import distribution

    monkeypatch.setitem(sys.modules, "optuna", None)  # as when the package is not installed: import fails
    with pytest.raises(TransferError) as err:
        distribution("optimizer.lr", "interval(0.1, 1)")
    assert "needs Optuna" in err.value.message and err.value.fix.startswith("pip install 'transfer-cli[optuna]'")


def test_train_points_a_search_space_to_transfer_tune(tmp_path):
    out = subprocess.run([sys.executable, "-m", "transfer_cli", "train", "-m", "hparams_search=optuna"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2
    err = " ".join(out.stderr.split())
    assert "search space of `transfer tune`" in err and "fix: transfer tune hparams_search=optuna" in err


def tune_args(root, study, *extra):
    return [*tiny_args(root), f"tune.dir={study}", *extra]


def test_tune_prunes_a_lagging_trial_and_records_a_failing_one(tmp_path, tiny_imagefolder):
    optuna = pytest.importorskip("optuna", minversion="4")
    from transfer_cli.sweeps.tune import tune

    study_dir = tmp_path / "study"
    study_dir.mkdir()
    db = study_dir / "optuna.db"
    # A finished trial whose val/loss was 0 at every epoch: any real run lags it from its first epoch on.
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name="default", direction="minimize")
    lr = optuna.distributions.FloatDistribution(1e-4, 3e-2, log=True)
    study.add_trial(optuna.trial.create_trial(params={"optimizer.lr": 1e-3}, distributions={"optimizer.lr": lr},
                                              value=0.0, intermediate_values={0: 0.0, 1: 0.0}))
    args = tune_args(tiny_imagefolder, study_dir, "trainer.max_epochs=2", "callbacks.monitor=val/loss",
                     "callbacks.mode=min", "tune.startup_trials=1", "tune.warmup_epochs=0")
    result = tune([*args, "tune.n_trials=2"])  # one trial done: one more runs, and is pruned after epoch 1
    trials = optuna_trials(db)
    assert states(trials) == ["COMPLETE", "PRUNED"] and result["ran"] == 1
    assert list(trials[1].intermediate_values) == [0]  # reported once, then stopped
    record = json.loads((study_dir / "1" / "job.json").read_text())
    assert record["status"] == "pruned" and record["epochs"] == 1 and "pruned after epoch 1" in record["error"]
    assert set(trials[1].params) == {"optimizer.lr", "optimizer.weight_decay", "model.head_hidden_dim"}

    # A sampled value the run rejects: the trial is marked failed, recorded, and the study goes on.
    result = tune([*args, "tune.n_trials=3", "optimizer=sgd", "optimizer.momentum=choice(-1.0)"])
    trials = optuna_trials(db)
    assert states(trials) == ["COMPLETE", "PRUNED", "FAIL"] and result["failed"] == 1
    record = json.loads((study_dir / "2" / "job.json").read_text())
    assert record["status"] == "failed" and "momentum" in record["error"]
    assert "optimizer.momentum=-1.0" in record["overrides"] and "optimizer=sgd" in record["overrides"]
    rows = summary_rows(study_dir)
    assert sorted(r["status"] for r in rows) == ["failed", "pruned"]  # the trial added by hand has no run dir


@pytest.mark.slow
def test_interrupted_optuna_study_continues_to_n_trials(tmp_path, tiny_imagefolder):
    pytest.importorskip("optuna", minversion="4")
    study_dir = tmp_path / "study"
    args = ["tune", *tune_args(tiny_imagefolder, study_dir, "tune.n_trials=3", "tune.pruner=none")]
    # Kill the first session (SIGKILL, no clean-up) once its second trial has started: the first is done.
    first = subprocess.Popen([sys.executable, "-m", "transfer_cli", *args], cwd=tmp_path, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (study_dir / "1" / "job.json").is_file() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert states(optuna_trials(study_dir / "optuna.db")) == ["COMPLETE", "RUNNING"]

    out = transfer(*args, cwd=tmp_path)  # the same command again
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 of 3 trials done, 1 interrupted (queued again); running 2 more" in " ".join(out.stdout.split())
    trials = optuna_trials(study_dir / "optuna.db")
    assert states(trials) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]  # the killed one failed, then re-run
    assert trials[2].user_attrs["rerun_of"] == 1 and trials[2].params == trials[1].params  # re-run first
    rows = summary_rows(study_dir)
    assert sorted(r["status"] for r in rows) == ["interrupted", "ok", "ok", "ok"]
    assert all("optimizer.lr=" in r["overrides"] for r in rows)
    again = transfer(*args, cwd=tmp_path)  # nothing left to run
    assert again.returncode == 0 and "3 of 3 trials done; running 0 more" in " ".join(again.stdout.split())
