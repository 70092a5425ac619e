"""`transfer tune [hparams_search=optuna] [overrides] ['key=<range>' ...]`: an Optuna study of trainings.

Optuna (>= 4) is driven directly, ask and tell: each trial samples the search space (tune.params, plus any sweep
override on the command line, in Hydra's sweep grammar), composes the config as `transfer train` would, and calls
`train(cfg)` in this process. After every validation epoch the trial reports callbacks.monitor and the pruner may
stop it. The study lives in a SQLite file in the study's folder under a fixed name, so running the same command
again continues it up to tune.n_trials; a trial left RUNNING by a killed process is marked failed and its
parameters are queued again, so it is the first one re-run (one process drives a study at a time). Every trial
leaves job.json in its run dir, so `transfer sweep-summary <study dir>` and the summary files work as for `-m`.

Optuna's own Lightning callback (optuna-integration) is written for the `lightning.pytorch` package, not the
`pytorch_lightning` package this tool trains with, hence sweeps/pruning.py. Nothing heavy is imported until the
arguments and the search space are valid.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Callable

from transfer_cli.config.args import ANY_OVERRIDE, parse_command_args
from transfer_cli.errors import TransferError
from transfer_cli.sweeps.records import JobRecord, NoValue, objective, run_outcome, write_record

log = logging.getLogger("transfer_cli.sweeps")

OPTUNA_EXTRA = "pip install 'transfer-cli[optuna]'  (Optuna >= 4)"
DEFAULT_SPACE = "hparams_search=optuna"
RERUN_OF = "rerun_of"  # user attribute of a trial queued again for one a killed process left RUNNING
SQLITE = "sqlite:///"


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise TransferError("transfer tune needs Optuna, which is not installed", OPTUNA_EXTRA) from None
    if int(optuna.__version__.split(".")[0]) < 4:
        raise TransferError(f"transfer tune needs Optuna >= 4, found {optuna.__version__}", OPTUNA_EXTRA)
    return optuna


def _flat(params: Any, prefix: str = "") -> dict[str, str]:
    """tune.params as {config key: range}; a key given as +tune.params.a.b=... arrives nested."""
    out: dict[str, str] = {}
    for key, value in (params or {}).items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def distribution(key: str, text: str) -> Any:
    """One range in Hydra's sweep grammar as an Optuna distribution (the mapping hydra-optuna-sweeper used)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    optuna = _optuna()
    dists = optuna.distributions
    try:
        override = OverridesParser.create().parse_override(f"{key}={text}")
    except HydraException as e:
        raise TransferError(f"tune.params.{key}={text} is not a range: {e}",
                            "write interval(1e-4, 1e-2), tag(log, interval(...)), choice(a, b) or range(1, 5)")
    if override.is_choice_sweep() or (override.is_sweep_override() and not override.is_interval_sweep()
                                      and not override.is_range_sweep()):
        return dists.CategoricalDistribution(list(override.sweep_iterator()))
    value = override.value()
    log_scale = "log" in getattr(value, "tags", set())
    if override.is_interval_sweep():
        if isinstance(value.start, int) and isinstance(value.end, int):  # int(interval(1, 8)): Hydra's cast
            return dists.IntDistribution(int(value.start), int(value.end), log=log_scale)
        return dists.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if override.is_range_sweep():  # range(start, stop, step): stop excluded, as in Python
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in values):
            return dists.IntDistribution(values[0], values[-1], step=int(value.step), log=log_scale)
        return dists.FloatDistribution(values[0], values[-1], step=float(value.step))
    raise TransferError(f"tune.params.{key}={text} is a single value, not a range",
                        f"e.g. {key}=choice({text}, ...) or set it as a plain override: {key}={text}")


def _as_override(key: str, value: Any) -> str:
    if isinstance(value, str) and not re.fullmatch(r"[\w\-./:]+", value):
        value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{key}={value}"


# tune.sampler / tune.pruner: the study's Optuna sampler (seeded by `seed`) and pruner (choices in config/choices.py)
SAMPLERS: dict[str, Callable[[int], Any]] = {
    "tpe": lambda seed: _optuna().samplers.TPESampler(seed=seed),
    "random": lambda seed: _optuna().samplers.RandomSampler(seed=seed),
}
PRUNERS: dict[str, Callable[[int, int], Any]] = {  # (trials before any pruning, epochs before a trial may be pruned)
    "median": lambda startup, warmup: _optuna().pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup),
    "hyperband": lambda startup, warmup: _optuna().pruners.HyperbandPruner(min_resource=max(1, warmup)),
    "none": lambda startup, warmup: _optuna().pruners.NopPruner(),
}


def open_study(storage: str, name: str, direction: str, sampler: Any, pruner: Any) -> Any:
    optuna = _optuna()
    study = optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise TransferError(f"the study {name!r} in {storage} was created to {study.direction.name.lower()} its "
                            f"objective, but callbacks.mode asks to {direction}",
                            "keep callbacks.mode as the study began, or start another: tune.study_name=<new name>")
    return study


def requeue_interrupted(study: Any) -> int:
    """Trials a killed process left RUNNING: marked failed, their parameters queued again. How many there were."""
    from optuna.trial import TrialState

    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={RERUN_OF: trial.number})
    return len(stale)


def trials_done(study: Any) -> int:
    """Trials that ran to an end (complete, pruned or failed), not counting those interrupted and re-queued."""
    trials = study.get_trials(deepcopy=False)
    rerun = {t.user_attrs.get(RERUN_OF) for t in trials}
    return sum(t.state.is_finished() and t.number not in rerun for t in trials)


def run_trial(study: Any, space: dict[str, Any], base: list[str], study_dir: Path, monitor: str, mode: str
              ) -> JobRecord:
    """One trial: sample, compose, train in <study dir>/<trial number>, tell Optuna how it went."""
    from optuna.trial import TrialState

    from transfer_cli.config.compose import as_schema, compose
    from transfer_cli.sweeps.callback import describe_error
    from transfer_cli.sweeps.pruning import PruneOnMonitor
    from transfer_cli.train import train  # torch, Lightning and timm load with the first trial

    trial = study.ask(space)
    run_dir = study_dir / str(trial.number)
    sampled = [_as_override(k, v) for k, v in trial.params.items()]
    record = JobRecord(job=str(trial.number), overrides=[*base, *sampled], status="interrupted", monitor=monitor,
                       mode=mode, run_dir=str(run_dir), error="started, never finished (killed?)",
                       extra={"optuna_trial": trial.number})
    started = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_record(record)  # until the trial ends: a kill leaves it "interrupted" in the summary
    try:
        cfg = as_schema(compose([DEFAULT_SPACE, *base, *sampled, f"paths.output_dir={run_dir}"]))
        pruning = PruneOnMonitor(trial, monitor)
        train(cfg, callbacks=[pruning])
        value = objective(run_dir, record.monitor, record.mode)
        outcome = run_outcome(run_dir, record.monitor, record.mode)
        record.best, record.epochs = outcome["best"], outcome["epochs"]
        record.extra.update(outcome["extra"])
        if pruning.pruned_at is not None:
            study.tell(trial, state=TrialState.PRUNED)
            record.status, record.error = "pruned", f"pruned after epoch {pruning.pruned_at + 1}"
        elif isinstance(value, NoValue):
            study.tell(trial, state=TrialState.FAIL)
            record.status, record.error = "failed", str(value)
        else:
            study.tell(trial, float(value))
            record.status, record.error = "ok", ""
    except Exception as err:  # a bad sample or a failing run: recorded, and the study goes on
        study.tell(trial, state=TrialState.FAIL)
        record.status, record.error = "failed", describe_error(err)
        if not isinstance(err, TransferError):
            log.error("trial %d failed", trial.number, exc_info=err)
    record.wall_time_s = round(time.time() - started, 1)
    write_record(record)
    return record


def _split(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """(plain overrides, sweep overrides as search dimensions {key: range})."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain, sweeps = [], {}
    for text, override in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if override.is_sweep_override():
            sweeps[override.key_or_group] = text.split("=", 1)[1]
        else:
            plain.append(text)
    return plain, sweeps


def tune(args: list[str]) -> dict[str, Any]:
    """Run (or continue) the study the arguments describe; returns its summary numbers."""
    from transfer_cli.config.compose import as_schema, compose
    from transfer_cli.sweeps.summary import build_summary

    _, overrides = parse_command_args("tune", args, {}, ANY_OVERRIDE)
    plain, sweeps = _split(overrides)
    for o in plain:
        if o.split("=", 1)[0].lstrip("+~") in ("resume", "paths.output_dir"):
            raise TransferError(f"{o}: every trial of `transfer tune` is a new run in the study's folder",
                                "set the study's folder with tune.dir=<folder>; resume a trial with transfer train")
    space_args = [o for o in plain if o.split("=", 1)[0] == "hparams_search"]
    base = [o for o in plain if o not in space_args]
    cfg = as_schema(compose([*(space_args or [DEFAULT_SPACE]), *base]))
    if str(cfg.trainer.strategy).startswith("ddp"):
        raise TransferError("transfer tune trains its trials in this process; DDP would start other processes",
                            "tune on one device (trainer=gpu or trainer=cpu); train the best recipe with DDP after")
    space_text = {**_flat(cfg.tune.params), **sweeps}
    if not space_text:
        raise TransferError("the search space is empty", "hparams_search=optuna, or a range such as "
                                                        "'optimizer.lr=tag(log, interval(1e-4, 1e-2))'")
    space = {key: distribution(key, text) for key, text in space_text.items()}
    name = cfg.tune.study_name or cfg.name
    study_dir = Path(cfg.tune.dir or Path("multirun") / cfg.name / f"optuna_{name}").expanduser().resolve()
    study_dir.mkdir(parents=True, exist_ok=True)
    storage = cfg.tune.storage or f"{SQLITE}{study_dir / 'optuna.db'}"
    direction = "maximize" if cfg.callbacks.mode == "max" else "minimize"
    study = open_study(storage, name, direction, SAMPLERS[cfg.tune.sampler](cfg.seed),
                       PRUNERS[cfg.tune.pruner](cfg.tune.startup_trials, cfg.tune.warmup_epochs))
    interrupted = requeue_interrupted(study)
    done = trials_done(study)
    left = max(0, cfg.tune.n_trials - done)
    print(f"study {name!r} ({storage}): {done} of {cfg.tune.n_trials} trials done"
          + (f", {interrupted} interrupted (queued again)" if interrupted else "") + f"; running {left} more, "
          f"{direction} {cfg.callbacks.monitor} over {', '.join(space_text)}", flush=True)
    # The trials' overrides are the user's plus the sampled ones; the space and its folder are the study's.
    keep = [o for o in base if not o.split("=", 1)[0].lstrip("+~").startswith("tune.")]
    records = [run_trial(study, space, keep, study_dir, cfg.callbacks.monitor, cfg.callbacks.mode)
               for _ in range(left)]
    summary = build_summary(study_dir, cfg.callbacks.monitor, cfg.callbacks.mode)
    failed = sum(r.status == "failed" for r in records)
    return {"study_dir": str(study_dir), "storage": storage, "trials": len(study.trials), "ran": len(records),
            "failed": failed, "best_command": summary.best_command}


def tune_command(args: list[str]) -> None:
    import sys

    result = tune(args)
    if result["failed"]:
        from transfer_cli.errors import print_error

        print_error(TransferError(f"{result['failed']} of {result['ran']} trials failed",
                                  f"see {result['study_dir']}/sweep_summary.md"))
        sys.exit(1)


__all__ = ["tune", "tune_command", "distribution", "requeue_interrupted", "trials_done", "SAMPLERS", "PRUNERS",
           "OPTUNA_EXTRA"]
