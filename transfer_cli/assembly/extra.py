"""Extra Lightning callbacks and loggers named on the command line as `_target_` nodes, the escape hatch
lightning-hydra-template users expect:

    transfer train +callbacks.extra.timer._target_=pytorch_lightning.callbacks.Timer \
        +callbacks.extra.timer.duration=00:12:00:00
    transfer train +logger.extra.tb._target_=pytorch_lightning.loggers.TensorBoardLogger +logger.extra.tb.save_dir=tb

Each node is instantiated by Hydra's own `instantiate`, beside the callbacks and loggers the config groups build.
"""

from __future__ import annotations

from typing import Any, Mapping

from transfer_cli.errors import TransferError


def instantiate_extra(nodes: Mapping[str, Any], key: str, kind: type) -> list[Any]:
    """One object per node of `nodes` (callbacks.extra or logger.extra), each an instance of `kind`."""
    if not nodes:
        return []
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    made = []
    for name, node in nodes.items():
        where = f"{key}.{name}"  # each has a _target_ (config/checks.py, before torch loads)
        try:
            obj = instantiate(dict(node))
        except InstantiationException as e:
            raise TransferError(f"{where} could not be made: {str(e).splitlines()[0]}",
                                f"check {where}._target_ (an importable class) and its arguments") from None
        if not isinstance(obj, kind):
            raise TransferError(f"{where}._target_={node['_target_']} is not a Lightning {kind.__name__}",
                                f"name a subclass of pytorch_lightning.{kind.__module__.split('.')[1]}.{kind.__name__}")
        made.append(obj)
    return made


__all__ = ["instantiate_extra"]
