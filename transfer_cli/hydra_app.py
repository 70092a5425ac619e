"""Run a command through hydra.main, so Hydra's conventions hold: run dirs, -m sweeps, --cfg, --help, launchers."""

from __future__ import annotations

import sys
from typing import Any

from transfer_cli.errors import TransferError


def _train_task(cfg: Any) -> Any:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from transfer_cli.cli import print_error
    from transfer_cli.config.compose import check_choices

    try:
        check_choices(cfg)
        from transfer_cli.train import train  # torch, Lightning and timm load only once the config is valid

        return train(cfg)
    except TransferError as err:
        print_error(err)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records the failed job; the sweep decides what happens next
        sys.exit(2)


def run_train_app(args: list[str]) -> None:
    import hydra

    from transfer_cli.config.compose import config_dir
    from transfer_cli.config.schema import register_configs

    register_configs()
    sys.argv = ["transfer train", *args]  # hydra.main parses sys.argv itself
    app = hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(_train_task)
    app()
