"""Hydra plugins that some configs need: a clear install command instead of Hydra's "could not find" error."""

from __future__ import annotations

import importlib.util

from transfer_cli.errors import TransferError

# (override prefix, plugin module, what to install)
PLUGINS = [
    ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper", "pip install hydra-optuna-sweeper (Optuna 2 only); "
     "or drive current Optuna with pruning: transfer tune"),
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
        if arg.lstrip("+").startswith("hparams_search="):  # a search space belongs to the command that searches
            raise TransferError(f"`{arg}` is a search space of `transfer tune`, which runs the Optuna study",
                                "transfer tune " + " ".join(a for a in args if a not in ("-m", "--multirun")))
        for prefix, module, install in PLUGINS:
            if arg.startswith(prefix) and not _installed(module):
                raise TransferError(f"`{arg}` needs the Hydra plugin {module.split('.')[-1]}, which is not installed",
                                    install)
