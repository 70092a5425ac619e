"""`transfer tune [hparams_search=optuna] [overrides] ['key=<range>' ...]`: an Optuna study of trainings.

Optuna (>= 4) is driven directly, ask and tell: each trial samples the search space (tune.params, plus any sweep
override on the command line, in Hydra's sweep grammar), composes the config as `transfer train` would, and calls
`train(cfg)` in this process. After every validation epoch the trial reports callbacks.monitor and the pruner may
stop it. The study lives in tune.storage (sweeps/study_storage.py; default a SQLite file in the study's folder)
under a fixed name, so running the same command again continues it up to tune.n_trials. Every trial leaves
job.json in its run dir, so `transfer sweep-summary <study dir>` and the summary files work as for `-m`.

Several workers may share one study: tune.workers=N starts N local `transfer tune` processes (sweeps/workers.py),
and any number of `transfer tune` commands on one storage (SLURM array tasks) join it alike. Each worker loops:
under the study's ask lock it fails the trials of dead workers and queues their params again (liveness.py),
counts the budget over the whole study and asks for a trial only while finished + running < n_trials (a queued
re-run always); then it trains that trial with a heartbeat. With nothing to ask it waits while other workers'
trials run, so a trial whose worker dies is re-run by a survivor; it exits when none runs. The sampler of each
trial is seeded with `seed` + the trial's number, so workers do not draw the same parameters.

Optuna's own Lightning callback (optuna-integration) is written for the `lightning.pytorch` package, not the
`pytorch_lightning` package this tool trains with, hence sweeps/pruning.py. Nothing heavy is imported until the
arguments and the search space are valid.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from transfer_cli.config.args import ANY_OVERRIDE, parse_command_args
from transfer_cli.config.overrides import override_key
from transfer_cli.errors import TransferError
from transfer_cli.sweeps.records import JobRecord, NoValue, objective, run_outcome, write_record
from transfer_cli.sweeps.space import OPTUNA_EXTRA, as_override, distribution, flat_params, split_sweeps
from transfer_cli.sweeps.space import optuna_module as _optuna
from transfer_cli.sweeps.study_storage import describe

log = logging.getLogger("transfer_cli.sweeps")

DEFAULT_SPACE = "hparams_search=optuna"


def _tpe(seed: int) -> Any:
    optuna = _optuna()
    with warnings.catch_warnings():  # constant_liar is experimental: TPE's own answer to parallel workers, which
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # treats running trials as bad
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


# tune.sampler / tune.pruner: the study's Optuna sampler (seeded by `seed` + the trial's number) and pruner
# (choices in config/choices.py)
SAMPLERS: dict[str, Callable[[int], Any]] = {
    "tpe": _tpe,
    "random": lambda seed: _optuna().samplers.RandomSampler(seed=seed),
}
PRUNERS: dict[str, Callable[[int, int], Any]] = {  # (trials before any pruning, epochs before a trial may be pruned)
    "median": lambda startup, warmup: _optuna().pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup),
    "hyperband": lambda startup, warmup: _optuna().pruners.HyperbandPruner(min_resource=max(1, warmup)),
    "none": lambda startup, warmup: _optuna().pruners.NopPruner(),
}


def open_study(storage: Any, where: str, name: str, direction: str, sampler: Any, pruner: Any) -> Any:
    optuna = _optuna()
    study = optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise TransferError(f"the study {name!r} in {where} was created to {study.direction.name.lower()} its "
                            f"objective, but callbacks.mode asks to {direction}",
                            "keep callbacks.mode as the study began, or start another: tune.study_name=<new name>")
    return study


def _tell(study: Any, trial: Any, *args: Any, **kwargs: Any) -> bool:
    """Tell a result; False when the trial was failed meanwhile by a worker that took this one for dead."""
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        study.tell(trial, *args, **kwargs)
    except (ValueError, UpdateFinishedTrialError):
        if not study.get_trials(deepcopy=False)[trial.number].state.is_finished():
            raise  # not that: a value Optuna refuses
        return False
    return True


def run_trial(study: Any, trial: Any, base: list[str], study_dir: Path, monitor: str, mode: str) -> JobRecord:
    """One trial, already asked: compose, train in <study dir>/<trial number>, tell Optuna how it went."""
    from optuna.trial import TrialState

    from transfer_cli.config.compose import compose
    from transfer_cli.config.resolve import resolve_run
    from transfer_cli.sweeps.callback import describe_error
    from transfer_cli.sweeps.pruning import PruneOnMonitor
    from transfer_cli.train import (
        train,  # torch, Lightning and timm load with the first trial
    )

    run_dir = study_dir / str(trial.number)  # trial numbers are unique in the study: so are the run dirs
    sampled = [as_override(k, v) for k, v in trial.params.items()]
    record = JobRecord(job=str(trial.number), overrides=[*base, *sampled], status="interrupted", monitor=monitor,
                       mode=mode, run_dir=str(run_dir), error="started, never finished (killed?)",
                       extra={"optuna_trial": trial.number})
    started = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_record(record)  # until the trial ends: a kill leaves it "interrupted" in the summary
    try:
        cfg = resolve_run(compose([DEFAULT_SPACE, *base, *sampled, f"paths.output_dir={run_dir}"]))
        pruning = PruneOnMonitor(trial, monitor)
        train(cfg, callbacks=[pruning])
        value = objective(run_dir, record.monitor, record.mode)
        outcome = run_outcome(run_dir, record.monitor, record.mode)
        record.best, record.epochs = outcome["best"], outcome["epochs"]
        record.extra.update(outcome["extra"])
        if pruning.pruned_at is not None:
            told = _tell(study, trial, state=TrialState.PRUNED)
            record.status, record.error = "pruned", f"pruned after epoch {pruning.pruned_at + 1}"
        elif isinstance(value, NoValue):
            told = _tell(study, trial, state=TrialState.FAIL)
            record.status, record.error = "failed", str(value)
        else:
            told = _tell(study, trial, float(value))
            record.status, record.error = "ok", ""
    except Exception as err:  # a bad sample or a failing run: recorded, and the study goes on
        told = _tell(study, trial, state=TrialState.FAIL)
        record.status, record.error = "failed", describe_error(err)
        if not isinstance(err, TransferError):
            log.error("trial %d failed", trial.number, exc_info=err)
    if not told:  # its heartbeat stopped for longer than tune.grace_s (a paused job, a file system that hung)
        ended = f"{record.status}: {record.error}" if record.error else record.status
        record.status = "failed"
        record.error = ("another worker took this trial for dead (no heartbeat for tune.grace_s) and queued its "
                        f"parameters again; this run ended {ended}")
    record.wall_time_s = round(time.time() - started, 1)
    write_record(record)
    return record


def tune(args: list[str]) -> dict[str, Any]:
    """Run (or continue, or join) the study the arguments describe; returns its summary numbers."""
    from transfer_cli.config.compose import as_schema, compose
    from transfer_cli.sweeps.summary import build_summary

    if "-m" in args or "--multirun" in args:
        raise TransferError("transfer tune starts its workers itself; -m and Hydra's launchers (hydra/launcher=slurm) "
                            "run `transfer train` jobs", "tune.workers=N on one machine; on SLURM, one `transfer tune "
                            "... tune.storage=journal` per task of a job array (README: Sweeps)")
    _, overrides = parse_command_args("tune", args, {}, ANY_OVERRIDE)
    plain, sweeps = split_sweeps(overrides)
    for o in plain:
        if override_key(o) in ("resume", "paths.output_dir"):
            raise TransferError(f"{o}: every trial of `transfer tune` is a new run in the study's folder",
                                "set the study's folder with tune.dir=<folder>; resume a trial with transfer train")
    space_args = [o for o in plain if override_key(o) == "hparams_search"]
    base = [o for o in plain if o not in space_args]
    cfg = as_schema(compose([*(space_args or [DEFAULT_SPACE]), *base]))
    if str(cfg.trainer.strategy).startswith("ddp"):
        raise TransferError("transfer tune trains its trials in this process; DDP would start other processes",
                            "tune on one device (trainer=gpu or trainer=cpu); train the best recipe with DDP after")
    space_text = {**flat_params(cfg.tune.params), **sweeps}
    if not space_text:
        raise TransferError("the search space is empty", "hparams_search=optuna, or a range such as "
                                                        "'optimizer.lr=tag(log, interval(1e-4, 1e-2))'")
    space = {key: distribution(key, text) for key, text in space_text.items()}
    name, study_dir = study_location(cfg)
    study_dir.mkdir(parents=True, exist_ok=True)
    where = describe(cfg.tune.storage, study_dir)
    if cfg.tune.workers > 1:
        from transfer_cli.sweeps.workers import run_local_workers

        connect(cfg, study_dir, name)  # the study exists (and its direction is checked) before any worker starts
        exits = run_local_workers(args, cfg.tune.workers, study_dir, cfg.trainer.accelerator)
        summary = build_summary(study_dir, cfg.callbacks.monitor, cfg.callbacks.mode)
        return {"study_dir": str(study_dir), "storage": where, "ran": len(summary.records),
                "failed": summary.counts.get("failed", 0), "workers_failed": sum(code != 0 for code in exits),
                "best_command": summary.best_command}
    records = work_on_study(cfg, space, base, study_dir, name)
    summary = build_summary(study_dir, cfg.callbacks.monitor, cfg.callbacks.mode)
    return {"study_dir": str(study_dir), "storage": where, "ran": len(records),
            "failed": sum(r.status == "failed" for r in records), "workers_failed": 0,
            "best_command": summary.best_command}


def connect(cfg: Any, study_dir: Path, name: str) -> tuple[Any, Any, Any]:
    """(storage, study, ask lock). Under the lock: workers starting together on a new SQLite file would race to
    create its tables ("table ... already exists")."""
    from transfer_cli.sweeps.study_storage import AskLock, open_storage

    t, lock = cfg.tune, AskLock(study_dir)
    direction = "maximize" if cfg.callbacks.mode == "max" else "minimize"
    with lock:
        storage = open_storage(t.storage, study_dir)
        study = open_study(storage, describe(t.storage, study_dir), name, direction, SAMPLERS[t.sampler](cfg.seed),
                           PRUNERS[t.pruner](t.startup_trials, t.warmup_epochs))
    return storage, study, lock


def work_on_study(cfg: Any, space: dict[str, Any], base: list[str], study_dir: Path, name: str) -> list[JobRecord]:
    """This process as one worker of the study: trials until the study has tune.n_trials and none runs."""
    from transfer_cli.sweeps.liveness import Heartbeat, fail_dead_trials, mark_alive, tally

    t = cfg.tune
    storage, study, lock = connect(cfg, study_dir, name)
    where, direction = describe(t.storage, study_dir), study.direction.name.lower()

    def study_seeded(number: int) -> Any:  # the study, with a sampler that draws trial `number`
        return _optuna().load_study(study_name=name, storage=storage, sampler=SAMPLERS[t.sampler](cfg.seed + number),
                                    pruner=PRUNERS[t.pruner](t.startup_trials, t.warmup_epochs))

    # The trials' overrides are the user's plus the sampled ones; the space and its folder are the study's.
    keep = [o for o in base if not override_key(o).startswith("tune.")]
    records: list[JobRecord] = []
    said_wait = False
    while True:
        with lock:
            requeued = fail_dead_trials(study, t.grace_s)
            count = tally(study)
            if not records and not said_wait:
                left = max(0, t.n_trials - count.done - count.running)
                print(f"study {name!r} ({where}): {count.done} of {t.n_trials} trials done"
                      + (f", {count.running} running in other workers" if count.running else "")
                      + (f", {len(requeued)} interrupted (queued again)" if requeued else "")
                      + f"; {left} left to run, {direction} {cfg.callbacks.monitor} over {', '.join(space)}",
                      flush=True)
            elif requeued:
                print(f"trials {', '.join(map(str, requeued))}: their workers died; queued again", flush=True)
            trial = None
            if count.wants_trial(t.n_trials):
                asking = study_seeded(len(study.get_trials(deepcopy=False)))
                trial = asking.ask(space)
                mark_alive(trial)
        if trial is not None:
            # From the ask on: the first trial of a worker imports torch, Lightning and timm before it trains.
            with Heartbeat(trial, t.heartbeat_s):
                records.append(run_trial(asking, trial, keep, study_dir, cfg.callbacks.monitor, cfg.callbacks.mode))
            continue
        if not count.running:
            return records
        if not said_wait:
            print(f"waiting while other workers run {count.running} trial(s): one whose worker dies is re-run here",
                  flush=True)
            said_wait = True
        time.sleep(t.heartbeat_s)


def study_location(cfg: Any) -> tuple[str, Path]:
    """(study name, study folder): tune.study_name or the run's name; tune.dir or multirun/<name>/optuna_<study>."""
    name = cfg.tune.study_name or cfg.name
    return name, Path(cfg.tune.dir or Path("multirun") / cfg.name / f"optuna_{name}").expanduser().resolve()


def tune_command(args: list[str]) -> None:
    import sys

    result = tune(args)
    if result["failed"] or result["workers_failed"]:
        from transfer_cli.errors import print_error

        what = f"{result['failed']} of {result['ran']} trials failed" if result["failed"] else ""
        if result["workers_failed"]:
            what += ("; " if what else "") + f"{result['workers_failed']} workers did not end cleanly"
        print_error(TransferError(what, f"see {result['study_dir']}/sweep_summary.md"
                                        + (" and workers/*.log" if result["workers_failed"] else "")))
        sys.exit(1)


__all__ = ["tune", "tune_command", "study_location", "work_on_study", "distribution", "SAMPLERS", "PRUNERS", "OPTUNA_EXTRA"]
