"""Run a command through hydra.main, so Hydra's conventions hold: run dirs, -m sweeps, --cfg, --help, launchers."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from transfer_cli.config.overrides import take
from transfer_cli.errors import TransferError, from_os_error, print_error
from transfer_cli.resume.plan import is_resume, resume_command, resume_launch
from transfer_cli.run_dir import check_outside_data, claim, is_child_rank, register_resolver, release
from transfer_cli.sweeps.callback import LAST_SWEEP
from transfer_cli.sweeps.distributed import relaunchable_job, remember_entry
from transfer_cli.sweeps.plugins import check_plugins
from transfer_cli.sweeps.records import objective


def _train_task(cfg: Any) -> Any:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from transfer_cli.config.choices import check_choices
    from transfer_cli.config.resolve import resolve_run

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        check_choices(cfg)
        typed = resolve_run(cfg, run_dir)  # the run's config, resolved once; every value checked before torch loads
        if not is_child_rank():  # the run owns its dir (a DDP rank > 0 shares rank 0's)
            claim(run_dir, resuming=bool(typed.resume))
        from transfer_cli.train import train  # torch, Lightning and timm load only once the config is valid

        with relaunchable_job([str(o) for o in hydra_cfg.overrides.task], hydra_cfg.runtime.output_dir, multirun):
            summary = train(typed)
        if multirun:  # a sweeper (Optuna) needs the number it optimises; the summary stays in the run dir
            return objective(Path(summary["run_dir"]), str(cfg.callbacks.monitor), str(cfg.callbacks.mode))
        return summary
    except (TransferError, OSError) as err:
        user_error = err if isinstance(err, TransferError) else from_os_error(err, _io_fix(run_dir))
        if user_error is None:
            raise
        print_error(user_error)
        if multirun:
            raise user_error  # the sweep callback records the failed job and the sweep goes on
        sys.exit(2)
    finally:
        if multirun:
            release(run_dir)


def _io_fix(run_dir: Path) -> str:
    from transfer_cli.run_files import RunLayout

    if RunLayout(run_dir).last.is_file():
        return f"free disk space or make the folder writable, then continue: {resume_command(run_dir)}"
    return "free disk space, or run elsewhere: hydra.run.dir=<a writable folder>"


# Hydra's flags that make `transfer train` do something other than one run (print, help, sweep, complete)
HYDRA_ONLY_FLAGS = ("-m", "--multirun", "-c", "--cfg", "-h", "--help", "--hydra-help", "--info", "-i",
                    "--resolve", "-sc", "--shell-completion", "-p", "--package")


def _before_hydra(args: list[str], resuming: bool) -> None:
    """What Hydra would otherwise turn into a traceback, or do to another run's files before the run starts: a
    config that does not compose or holds a value out of range, and a run dir that is a file, read-only, in use
    or holding a run."""
    from transfer_cli.config.compose import as_schema, compose

    other = [a for a in args if a.split("=", 1)[0] in HYDRA_ONLY_FLAGS]  # --cfg, --help, -m, ...: no single run now
    run_dir = take(args, "hydra.run.dir")[0]
    if not resuming and not other and not any(a.startswith("-") for a in args):
        typed = as_schema(compose(args))  # a single run: compose it now (a sweep's jobs are checked one by one)
        # before Hydra or claim() makes the dir; the default run dirs are under ./outputs
        for target in (run_dir or "outputs", take(args, "paths.output_dir")[0]):
            if target is not None:
                check_outside_data(target, typed.data.source, typed.data.root)
        if typed.logger.mlflow:  # a damaged or read-only store: refused now, not after the data and model load
            from transfer_cli.tracking.mlflow_store import check_sqlite_store, run_store

            check_sqlite_store(run_store(typed.logger.tracking_uri))
    if run_dir is not None and not other and not is_child_rank():
        claim(Path(run_dir), resuming=resuming)  # created and locked now, so Hydra writes .hydra/ into our dir
    sweep_dir = take(args, "hydra.sweep.dir")[0]
    if sweep_dir is not None and Path(sweep_dir).is_dir() and any(Path(sweep_dir).glob("*/job.json")):
        raise TransferError(f"the sweep dir {sweep_dir} holds an earlier sweep; its jobs would be written over",
                            "leave hydra.sweep.dir out (a new dir each sweep), or set hydra.sweep.dir=<a new folder>")


def run_train_app(args: list[str]) -> None:
    import hydra

    from transfer_cli.config.folders import config_dir
    from transfer_cli.config.schema import register_configs

    check_plugins(args)
    register_configs()
    register_resolver()
    remember_entry(sys.argv[0])  # how this process was started: DDP re-launches it for the other ranks
    with ExitStack() as stack:
        resuming = is_resume(args)
        if resuming:  # the run's own config and run dir (transfer_cli/resume/plan.py)
            args = stack.enter_context(resume_launch(args))
        _before_hydra(args, resuming)
        sys.argv = ["transfer train", *args]  # hydra.main parses sys.argv itself
        app = hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(_train_task)
        app()
    if LAST_SWEEP.get("failed"):  # the sweep went on past them; its exit status still says so
        print_error(TransferError(f"{LAST_SWEEP['failed']} of {LAST_SWEEP['jobs']} sweep jobs failed",
                                  f"see {LAST_SWEEP['sweep_dir']}/sweep_summary.md; rebuild it with "
                                  f"`transfer sweep-summary {LAST_SWEEP['sweep_dir']}`"))
        sys.exit(1)
