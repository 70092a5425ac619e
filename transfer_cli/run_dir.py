"""A run owns its run dir: a lock naming the process, fresh default dirs, and no run written over another.

Two trainings writing into one dir mix their files (one's config beside the other's checkpoints, a metrics.csv
that neither wrote alone), and a run started in a finished run's dir replaces it. So:
- the default run dir is claimed with an atomic mkdir, with a suffix when another run took that second's name;
- a run holds `<run dir>/.transfer.lock` (PID, host, start time) from start to exit; a second run in the same dir
  is refused while the owner lives;
- a dir that holds a finished or interrupted run is refused unless the run is resumed (`resume=`);
- a run dir inside an image folder's root is refused (check_outside_data).
Only the standard library is used here: these checks come before torch loads.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import socket
import time
from pathlib import Path
from typing import Optional

from transfer_cli.errors import TransferError
from transfer_cli.run_files import CHECKPOINT_DIR, METRICS, SUMMARY, RunLayout

LOCK_NAME = ".transfer.lock"
# What a run that trained leaves in its dir. Hydra's .hydra/ and train.log are written before a run starts, and a
# run that failed before training leaves only those and config.yaml: neither counts as a run to protect.
RUN_ARTIFACTS = (f"{CHECKPOINT_DIR}/*.ckpt", SUMMARY, METRICS)

_FRESH: dict[str, str] = {}  # the dirs this process claimed, by the name asked for
_HELD: set[Path] = set()


def fresh_dir(path: str) -> str:
    """`path`, or `path_2`, `path_3`, ... : the first that did not exist, created now (atomically), so two runs
    started in the same second get two dirs. The same name asked twice in one process gives the same dir."""
    if path in _FRESH:
        return _FRESH[path]
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = base if n == 1 else base.with_name(f"{base.name}_{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        _FRESH[path] = str(candidate)
        return str(candidate)
    raise TransferError(f"no free run dir name next to {base}", "clean up old runs, or set hydra.run.dir=<folder>")


def register_resolver() -> None:
    """`${transfer_fresh_dir:...}` for configs/hydra/default.yaml's run and sweep dirs."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("transfer_fresh_dir"):
        OmegaConf.register_new_resolver("transfer_fresh_dir", fresh_dir)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def read_lock(run_dir: Path) -> Optional[dict]:
    try:
        return json.loads((run_dir / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None


def owner_alive(lock: dict) -> bool:
    """Whether the process named by a lock still runs; on another host we cannot tell, so assume it does."""
    if lock.get("host") != socket.gethostname():
        return True
    return _pid_alive(int(lock.get("pid", -1)))


def _resume_hint(run_dir: Path) -> str:
    return f"transfer train resume={shlex.quote(str(run_dir))}"


def holds_a_run(run_dir: Path) -> bool:
    return any(any(Path(run_dir).glob(pattern)) for pattern in RUN_ARTIFACTS)


def check_free(run_dir: Path, resuming: bool = False) -> None:
    """Refuse a dir that another live run holds, that is a file, or (unless resuming) that holds a run."""
    run_dir = Path(run_dir).expanduser().resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise TransferError(f"the run dir {run_dir} is an existing file",
                            "point hydra.run.dir at a folder (a new one for a new run)")
    lock = read_lock(run_dir) if run_dir.is_dir() else None
    if lock is not None and lock.get("pid") != os.getpid() and owner_alive(lock):
        raise TransferError(
            f"the run dir {run_dir} is in use by another run (PID {lock.get('pid')} on {lock.get('host')}, "
            f"started {lock.get('started')})",
            "wait for it to finish, or start this run elsewhere: leave hydra.run.dir out (a new dir each run) or "
            "set hydra.run.dir=<a new folder>",
        )
    if not resuming and run_dir.is_dir() and holds_a_run(run_dir) and run_dir not in _HELD:
        what = "a finished run" if RunLayout(run_dir).summary.exists() else "an interrupted run"
        raise TransferError(
            f"the run dir {run_dir} holds {what}; a new run would write over its files",
            f"continue it: {_resume_hint(run_dir)}; or start a new run in a new dir: leave hydra.run.dir out, "
            "or set hydra.run.dir=<a new folder>",
        )


def check_outside_data(run_dir: str | Path, source: str, data_root: Optional[str]) -> None:
    """Refuse a run dir in (or at) the root of a `data=imagefolder` data set: the next scan of that folder would
    read the run dir, and the PNGs every run writes into it, as images of a class, and the run's files would be
    mixed into the user's data. A CSV names its images, so its folder can hold runs."""
    if source != "imagefolder" or not data_root:
        return
    root = Path(data_root).expanduser().resolve()
    run = Path(run_dir).expanduser().resolve()
    if run == root or root in run.parents:
        raise TransferError(
            f"the run dir {run} is inside the data folder data.root={root}: its files would be read as images "
            "of a class by the next run and mixed into your data",
            f"put runs outside {root}: set hydra.run.dir=<a folder outside it>, or run `transfer train` from "
            "another folder (the default run dir is ./outputs/...)",
        )


def claim(run_dir: Path, resuming: bool = False) -> None:
    """Take `run_dir` for this process (released at exit), after check_free. A stale lock (its process died,
    e.g. killed with -9) is taken over when resuming."""
    run_dir = Path(run_dir).expanduser().resolve()
    if run_dir in _HELD:
        return
    check_free(run_dir, resuming)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = run_dir / LOCK_NAME
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # stale (check_free found its owner dead) or our own: replace it
            old = read_lock(run_dir)
            if old is not None and old.get("pid") != os.getpid() and owner_alive(old):
                check_free(run_dir, resuming)  # lost a race to a live run: refuse with its name
            lock.unlink(missing_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(record + "\n")
    except OSError as e:
        raise TransferError(f"cannot use the run dir {run_dir}: {e.strerror or e}",
                            "choose a writable folder: hydra.run.dir=<folder>, or run from a writable directory")
    _HELD.add(run_dir)
    atexit.register(release, run_dir)


def held_dirs() -> set[Path]:
    return set(_HELD)


def release(run_dir: Path) -> None:
    run_dir = Path(run_dir).expanduser().resolve()
    if run_dir not in _HELD:
        return
    _HELD.discard(run_dir)
    lock = read_lock(run_dir)
    if lock is not None and lock.get("pid") == os.getpid():
        (run_dir / LOCK_NAME).unlink(missing_ok=True)


def is_child_rank() -> bool:
    """A process that Lightning (DDP) or SLURM started for another rank of the same run: its rank 0 owns the dir."""
    return "LOCAL_RANK" in os.environ or os.environ.get("SLURM_PROCID", "0") not in ("", "0")


__all__ = ["fresh_dir", "register_resolver", "check_free", "check_outside_data", "claim", "release", "held_dirs", "holds_a_run", "read_lock",
           "owner_alive", "is_child_rank", "LOCK_NAME"]
