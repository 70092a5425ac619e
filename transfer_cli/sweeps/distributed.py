"""DDP under Hydra: let Lightning re-launch `transfer train` for the other ranks, and keep sweep jobs apart.

Lightning's subprocess launcher starts rank k as `python <argv[0]> <argv[1:]> hydra.run.dir=<run.dir> ...`
(`_hydra_subprocess_cmd`). Our entry point rewrote sys.argv for hydra.main, and in a sweep argv still holds `-m`
and the swept lists, so a child would start a sweep of its own, in other dirs (lightning-hydra-template #393).
`relaunchable_job` gives the children this job's own overrides, without `-m`, and this job's output dir; and
afterwards it removes what the DDP run left in the process (the rendezvous variables, among them LOCAL_RANK,
whose presence would make the next job's Lightning believe its processes are started externally, and the
process group), so the next job of a sweep launches its ranks afresh instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

# argv[0] as the user's process was started (`.../bin/transfer` or `.../transfer_cli/__main__.py`).
_ENTRY: list[str] = []


def remember_entry(argv0: str) -> None:
    _ENTRY[:] = [argv0]


def _destroy_process_group() -> None:
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def relaunchable_job(overrides: list[str], output_dir: str, multirun: bool) -> Iterator[None]:
    if "LOCAL_RANK" in os.environ or not _ENTRY:  # a child rank (or a launcher that starts the ranks itself)
        yield
        return
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    saved_argv, saved_env = list(sys.argv), dict(os.environ)
    sys.argv = [_ENTRY[0], "train", *overrides]
    if multirun:  # the children run single jobs: point their run dir at this job's dir
        with read_write(HydraConfig.get().run):
            HydraConfig.get().run.dir = output_dir
    try:
        yield
    finally:
        sys.argv = saved_argv
        if multirun:
            _destroy_process_group()
            os.environ.clear()
            os.environ.update(saved_env)
