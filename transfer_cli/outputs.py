"""Where a command writes, decided the same way for every command, and never over what it did not write.

The conventions (README, "What a run leaves behind"): `output=` names what a command writes, a file for the
commands that write one file (predict, export, augment-preview) and a folder for those that write several (eval,
lr-find); a folder given where a file is expected means `<folder>/<the default file name>`. A command refuses to
write over one of its inputs, over a file of another kind (a checkpoint, a user's CSV), and into a run's own dir.
These checks run before any work, so a refused command loses nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional

from transfer_cli.run_files import CHECKPOINT_DIR
from transfer_cli.errors import TransferError
from transfer_cli.run_dir import holds_a_run


def output_file(path: str | Path, default_name: str, *, inputs: Iterable[str | Path] = (),
                ours: Optional[Callable[[Path], bool]] = None, option: str = "output") -> Path:
    """The file a command writes: `path`, or `path/default_name` when `path` is a folder.

    Refused: one of `inputs`, a folder that is a run dir's checkpoints, and an existing file that `ours` (what a
    previous run of this command wrote) does not recognise.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        target = target / default_name
    target = target.resolve()
    for source in inputs:
        if Path(source).expanduser().resolve() == target:
            raise TransferError(f"{option}={path} is one of this command's inputs; writing there would destroy it",
                                f"{option}=<another file>, e.g. {option}={target.with_name(default_name)}")
    if target.parent.name == CHECKPOINT_DIR or target.suffix == ".ckpt":
        raise TransferError(f"{option}={path} is inside a run's checkpoints", f"{option}=<a file outside it>")
    if target.exists() and (target.is_dir() or ours is None or not ours(target)):
        raise TransferError(f"{option}={path}: {target} exists and was not written by this command",
                            f"{option}=<a new file>, or move {target.name} away first")
    return target


def output_dir(path: str | Path, option: str = "output") -> Path:
    """The folder a command writes several files into; refused when it is a file or holds a training run."""
    target = Path(path).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise TransferError(f"{option}={path} is a file, not a folder", f"{option}=<a folder>")
    if target.is_dir() and holds_a_run(target):
        raise TransferError(f"{option}={path} is a training run's dir; its files would be written over",
                            f"{option}=<a folder of its own>, e.g. {option}={target / 'out'}")
    return target


def command_dir(chosen: Optional[str | Path], command: str) -> Path:
    """The folder a command writes its files into: `chosen` (checked as output_dir), else a fresh
    outputs/<command>/<date>_<time> of its own (`_2`, `_3`, ... when two start in the same second)."""
    if chosen:
        return output_dir(chosen)
    import time

    from transfer_cli.run_dir import fresh_dir

    return Path(fresh_dir(f"outputs/{command}/{time.strftime('%Y-%m-%d_%H-%M-%S')}")).resolve()


__all__ = ["output_file", "output_dir", "command_dir"]
