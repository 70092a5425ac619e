"""Where a `transfer tune` study lives (tune.storage), and the lock under which its workers ask for trials.

- unset: `sqlite:///<tune.dir>/optuna.db`: several workers on one machine (SQLite locks through the local file
  system; on NFS its locking is unreliable, Optuna's and SQLite's docs say);
- `journal` or `journal:<file>`: Optuna's JournalFileBackend (`<tune.dir>/optuna.journal` when no file is named),
  one append-only log file, made for workers on several machines that share a file system (NFS included);
- any other value is an RDB URL (postgresql://..., mysql://...): a database server all workers reach.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from transfer_cli.atomic import atomic_write_text

SQLITE = "sqlite:///"
JOURNAL = "journal"
JOURNAL_FILE = "optuna.journal"
ASK_LOCK = ".ask"  # in the study dir: Optuna's lock makes <dir>/.ask.lock next to it
ASK_LOCK_GRACE_S = 60  # a lock held longer than this is taken as left by a killed worker (an ask takes < 1 s)


def describe(setting: Optional[str], study_dir: Path) -> str:
    """The storage as the user reads it: a URL, or journal:<file>."""
    if not setting:
        return f"{SQLITE}{study_dir / 'optuna.db'}"
    if setting == JOURNAL or setting.startswith(JOURNAL + ":"):
        path = setting[len(JOURNAL) + 1:] or str(study_dir / JOURNAL_FILE)
        return f"{JOURNAL}:{Path(path).expanduser().resolve()}"
    return setting


def open_storage(setting: Optional[str], study_dir: Path) -> Any:
    """The Optuna storage object of tune.storage (see the module's docstring)."""
    import optuna

    url = describe(setting, study_dir)
    if url.startswith(JOURNAL + ":"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url[len(JOURNAL) + 1:]))
    # Workers writing at once wait for SQLite's lock instead of failing after the default 5 s.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


class AskLock:
    """One worker at a time judges dead trials, counts the budget and asks, so N workers never start more than
    tune.n_trials trials. Optuna's symlink lock: the one its journal storage uses, made for NFS too."""

    def __init__(self, study_dir: Path):
        from optuna.storages.journal import JournalFileSymlinkLock

        target = study_dir / ASK_LOCK
        if not target.exists():  # the lock links to it; a missing target would make the waiters spin
            atomic_write_text(target, "")
        self._lock = JournalFileSymlinkLock(str(target), grace_period=ASK_LOCK_GRACE_S)

    def __enter__(self) -> "AskLock":
        self._lock.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()


__all__ = ["describe", "open_storage", "AskLock", "SQLITE", "JOURNAL"]
