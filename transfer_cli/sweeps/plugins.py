"""Hydra plugins that some configs need: a clear install command instead of Hydra's "could not find" error."""

from __future__ import annotations

import importlib.util

from transfer_cli.errors import TransferError

# (override prefix, plugin module, what to install)
PLUGINS = [
    ("hparams_search=optuna", "hydra_plugins.hydra_optuna_sweeper", "pip install 'transfer-cli[optuna]'"),
    ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper", "pip install 'transfer-cli[optuna]'"),
    ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "pip install 'transfer-cli[slurm]'"),
    ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher", "pip install 'transfer-cli[slurm]'"),
]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the hydra_plugins namespace itself is absent
        return False


def check_plugins(args: list[str]) -> None:
    for arg in args:
        for prefix, module, install in PLUGINS:
            if arg.startswith(prefix) and not _installed(module):
                raise TransferError(f"`{arg}` needs the Hydra plugin {module.split('.')[-1]}, which is not installed",
                                    install)
