"""Run a command through hydra.main, so Hydra's conventions hold: run dirs, -m sweeps, --cfg, --help, launchers."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from transfer_cli.errors import TransferError, print_error
from transfer_cli.resume.plan import is_resume, resume_launch
from transfer_cli.sweeps.callback import LAST_SWEEP
from transfer_cli.sweeps.distributed import relaunchable_job, remember_entry
from transfer_cli.sweeps.plugins import check_plugins
from transfer_cli.sweeps.records import objective


def _train_task(cfg: Any) -> Any:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from transfer_cli.config.choices import check_choices

    try:
        check_choices(cfg)
        from transfer_cli.train import train  # torch, Lightning and timm load only once the config is valid

        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        with relaunchable_job([str(o) for o in hydra_cfg.overrides.task], hydra_cfg.runtime.output_dir, multirun):
            summary = train(cfg)
        if multirun:  # a sweeper (Optuna) needs the number it optimises; the summary stays in the run dir
            return objective(Path(summary["run_dir"]), str(cfg.callbacks.monitor), str(cfg.callbacks.mode))
        return summary
    except TransferError as err:
        print_error(err)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweep callback records the failed job and the sweep goes on
        sys.exit(2)


def run_train_app(args: list[str]) -> None:
    import hydra

    from transfer_cli.config.folders import config_dir
    from transfer_cli.config.schema import register_configs

    check_plugins(args)
    register_configs()
    remember_entry(sys.argv[0])  # how this process was started: DDP re-launches it for the other ranks
    with ExitStack() as stack:
        if is_resume(args):  # the run's own config and run dir (transfer_cli/resume/plan.py)
            args = stack.enter_context(resume_launch(args))
        sys.argv = ["transfer train", *args]  # hydra.main parses sys.argv itself
        app = hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(_train_task)
        app()
    if LAST_SWEEP.get("failed"):  # the sweep went on past them; its exit status still says so
        print_error(TransferError(f"{LAST_SWEEP['failed']} of {LAST_SWEEP['jobs']} sweep jobs failed",
                                  f"see {LAST_SWEEP['sweep_dir']}/sweep_summary.md; rebuild it with "
                                  f"`transfer sweep-summary {LAST_SWEEP['sweep_dir']}`"))
        sys.exit(1)
