"""Sweeps as a user runs them: `transfer train -m` subprocesses on tiny data, the summary files, Optuna studies."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import tiny_run_overrides, transfer

from transfer_cli.cli import main
from transfer_cli.errors import TransferError
from transfer_cli.sweeps.summary import build_summary


def tiny_args(root):
    return tiny_run_overrides(root, None, "trainer.max_epochs=1")


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
    out = transfer("train", "-m", "hparams_search=optuna", timeout=120, cwd=tmp_path)
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
    assert "1 of 3 trials done, 1 interrupted (queued again); 2 left to run" in " ".join(out.stdout.split())
    trials = optuna_trials(study_dir / "optuna.db")
    assert states(trials) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]  # the killed one failed, then re-run
    assert trials[2].system_attrs["failed_trial"] == 1 and trials[2].params == trials[1].params  # re-run first
    rows = summary_rows(study_dir)
    assert sorted(r["status"] for r in rows) == ["interrupted", "ok", "ok", "ok"]
    assert all("optimizer.lr=" in r["overrides"] for r in rows)
    again = transfer(*args, cwd=tmp_path)  # nothing left to run
    assert again.returncode == 0 and "3 of 3 trials done; 0 left to run" in " ".join(again.stdout.split())


# Several workers on one study (sweeps/liveness.py, study_storage.py, workers.py)

STORAGES = {"sqlite": None, "journal": "journal"}  # tune.storage: unset (SQLite in tune.dir) or a journal file


def open_tune_study(study_dir, storage, name="default"):
    import optuna

    from transfer_cli.sweeps.study_storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage, study_dir))


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("storage", STORAGES)
def test_only_trials_of_dead_workers_are_failed_and_queued_again(tmp_path, storage):
    optuna = pytest.importorskip("optuna", minversion="4")
    from transfer_cli.sweeps.liveness import HEARTBEAT, WORKER, fail_dead_trials, tally
    from transfer_cli.sweeps.study_storage import open_storage

    study = optuna.create_study(storage=open_storage(STORAGES[storage], tmp_path), study_name="default")
    lr = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    here, now = socket.gethostname(), time.time()
    workers = {  # lr -> (worker, last heartbeat)
        1e-4: ({"host": "elsewhere", "pid": 1}, now),  # live on another host: only its heartbeat tells
        2e-4: ({"host": "elsewhere", "pid": 1}, now - 600),  # no heartbeat for 10 minutes: dead
        3e-4: ({"host": here, "pid": dead_pid()}, now),  # this host, its process is gone: dead at once
        4e-4: ({"host": here, "pid": os.getpid()}, now),  # this process: alive
    }
    for value, (worker, beat) in workers.items():
        study.enqueue_trial({"lr": value})
        trial = study.ask(lr)
        trial.set_user_attr(WORKER, worker)
        trial.set_user_attr(HEARTBEAT, beat)

    assert fail_dead_trials(study, grace_s=120) == [1, 2]
    assert fail_dead_trials(study, grace_s=120) == []  # judged once: never queued twice
    trials = study.get_trials()
    assert states(trials) == ["RUNNING", "FAIL", "FAIL", "RUNNING", "WAITING", "WAITING"]
    assert [(t.params, t.system_attrs["failed_trial"]) for t in trials[4:]] == [({"lr": 2e-4}, 1), ({"lr": 3e-4}, 2)]
    count = tally(study)
    assert (count.done, count.running, count.waiting) == (0, 2, 2)  # the failed two are not counted: they re-run
    assert count.wants_trial(n_trials=4)  # a queued re-run always runs, even with the budget taken
    rerun = study.ask(lr)
    assert rerun.number == 4 and rerun.params == {"lr": 2e-4}


def test_tune_worker_settings_are_checked(tmp_path):
    from transfer_cli.config.compose import as_schema, compose
    from transfer_cli.sweeps.tune import tune
    from transfer_cli.sweeps.workers import worker_devices

    with pytest.raises(TransferError, match="tune.grace_s=20 is not longer than tune.heartbeat_s=30"):
        as_schema(compose(["hparams_search=optuna", "tune.grace_s=20"]))
    with pytest.raises(TransferError, match="neither an Optuna RDB URL nor a journal file") as err:
        as_schema(compose(["hparams_search=optuna", "tune.storage=study.db"]))
    assert "tune.storage=journal" in err.value.fix
    with pytest.raises(TransferError, match="tune.workers=0 is out of range"):
        as_schema(compose(["hparams_search=optuna", "tune.workers=0"]))
    with pytest.raises(TransferError, match="starts its workers itself") as err:
        tune(["-m", "hydra/launcher=slurm"])
    assert "tune.workers=N" in err.value.fix and "job array" in err.value.fix
    assert worker_devices("gpu", 3, ["0", "1"]) == ["0", "1", "0"]  # one GPU each, shared round robin past 2
    assert worker_devices("auto", 2, ["GPU-a1"]) == ["GPU-a1", "GPU-a1"]
    assert worker_devices("cpu", 2, ["0", "1"]) == [None, None] == worker_devices("auto", 2, [])


def completed(trials):
    return [t for t in trials if t.state.name == "COMPLETE"]


@pytest.mark.slow
@pytest.mark.parametrize("storage", STORAGES)
def test_workers_share_one_study_up_to_n_trials(tmp_path, tiny_imagefolder, storage):
    pytest.importorskip("optuna", minversion="4")
    study_dir = tmp_path / "study"
    extra = [f"tune.storage={STORAGES[storage]}"] if STORAGES[storage] else []
    # A heartbeat every second, dead after 10 s without one: the trials (several seconds each) stay alive only
    # if the heartbeats of both workers get through while they train.
    out = transfer("tune", *tune_args(tiny_imagefolder, study_dir, "tune.n_trials=4", "tune.pruner=none",
                                      "tune.workers=2", "tune.heartbeat_s=1", "tune.grace_s=10", *extra), cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "2 workers on CPU" in out.stdout and "worker 0 (PID" in out.stdout and "worker 1 (PID" in out.stdout
    trials = open_tune_study(study_dir, STORAGES[storage]).trials
    assert states(trials) == ["COMPLETE"] * 4  # the budget counts the whole study: no worker asked a fifth
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == 4  # each worker's sampler is seeded by the trial's number: no draw twice
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # both workers trained
    beats = [t.user_attrs["heartbeat"] - t.datetime_start.timestamp() for t in trials]
    # recorded while training, not only when the trial began (a trial on cached features may end within a beat)
    assert max(beats) >= 1, beats
    rows = summary_rows(study_dir)
    assert sorted(r["job"] for r in rows) == ["0", "1", "2", "3"] and {r["status"] for r in rows} == {"ok"}
    for i in range(2):
        assert "0 of 4 trials done" in (study_dir / "workers" / f"{i}.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("storage", STORAGES)
def test_a_trial_of_a_killed_worker_is_rerun_once_by_another(tmp_path, tiny_imagefolder, storage):
    pytest.importorskip("optuna", minversion="4")
    study_dir = tmp_path / "study"
    extra = [f"tune.storage={STORAGES[storage]}"] if STORAGES[storage] else []
    args = ["tune", *tune_args(tiny_imagefolder, study_dir, "tune.n_trials=3", "tune.pruner=none", *extra)]
    # Two workers joining one study, as two SLURM array tasks would: two plain `transfer tune` commands.
    workers = [subprocess.Popen([sys.executable, "-m", "transfer_cli", *args], cwd=tmp_path, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        victim, deadline = None, time.time() + 300
        while victim is None and time.time() < deadline:  # a trial that has begun to train: its job.json is there
            time.sleep(0.5)
            if not list(study_dir.glob("*/job.json")):  # before one: the study (or its tables) may not exist yet
                continue
            for trial in open_tune_study(study_dir, STORAGES[storage]).trials:
                if trial.state.name == "RUNNING" and (study_dir / str(trial.number) / "job.json").is_file():
                    victim = trial
                    break
        assert victim is not None, "no trial started"
        killed = next(w for w in workers if w.pid == victim.user_attrs["worker"]["pid"])
        os.killpg(killed.pid, signal.SIGKILL)  # mid-trial, no clean-up
        killed.wait()  # reaped, as a shell would: a zombie's PID still looks alive
        started = time.time()
        survivor = next(w for w in workers if w is not killed)
        output, _ = survivor.communicate(timeout=400)
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
                w.wait()
    assert survivor.returncode == 0, output[-3000:]
    assert time.time() - started < 120  # a dead PID on this host is dead at once: no wait for tune.grace_s
    trials = open_tune_study(study_dir, STORAGES[storage]).trials
    assert sorted(states(trials)) == ["COMPLETE"] * 3 + ["FAIL"]  # exactly n_trials complete, the killed one failed
    assert trials[victim.number].state.name == "FAIL"
    reruns = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(reruns) == 1 and reruns[0].state.name == "COMPLETE" and reruns[0].params == victim.params
    assert reruns[0].user_attrs["worker"]["pid"] == survivor.pid  # the survivor re-ran it, not a later command
    assert len({tuple(sorted(t.params.items())) for t in completed(trials)}) == 3  # no params trained twice
    rows = {r["job"]: r["status"] for r in summary_rows(study_dir)}
    assert rows.pop(str(victim.number)) == "interrupted" and set(rows.values()) == {"ok"} and len(rows) == 3


def test_the_default_study_folder_is_named_after_the_study():
    """hparams_search=optuna names no folder: the study's name (tune.study_name, else the run's) names it."""
    from transfer_cli.config.compose import as_schema, compose
    from transfer_cli.sweeps.tune import study_location

    for extra, name in (([], "demo"), (["tune.study_name=lr_search"], "lr_search")):
        study, folder = study_location(as_schema(compose(["hparams_search=optuna", "experiment=demo", *extra])))
        assert study == name and folder.parts[-3:] == ("multirun", "demo", f"optuna_{name}")
