"""`transfer train <overrides>`: the run's own-data defaults and override checks, then Hydra's app (hydra_app.py)."""

from __future__ import annotations

from transfer_cli.config.compose import check_overrides, own_data_defaults


def train_command(args: list[str]) -> None:
    from transfer_cli.hydra_app import run_train_app

    args = own_data_defaults(args)  # your data, no experiment: the defaults of the transfer mode, not the demo's
    check_overrides(args)
    run_train_app(args)
