"""The MLflow store a run will log to, checked without MLflow (so before torch loads, and before MLflow's own
~100 s of retries on a file it cannot open): a SQLite file that is not a database, or a store folder this
process may not write to, is refused with what to do instead; the user's store is never changed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from transfer_cli.errors import TransferError

SQLITE = "sqlite:///"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"{SQLITE}{Path.cwd() / 'outputs' / 'mlflow.db'}"


def run_store(tracking_uri: Optional[str]) -> str:
    """The store a new run logs to: logger.tracking_uri, else $MLFLOW_TRACKING_URI, else ./outputs/mlflow.db."""
    return tracking_uri or default_tracking_uri()


SQLITE_MAGIC = b"SQLite format 3\x00"  # the first bytes of every SQLite database file
DAMAGED = "not an SQLite database (the file does not start with SQLite's header)"


def check_sqlite_store(uri: str) -> None:
    """A SQLite store that cannot work, refused at once. A missing or empty file is a new store; a missing
    folder is made by the run, so the nearest folder that exists must be writable."""
    if not uri.startswith(SQLITE):
        return
    db = Path(uri[len(SQLITE):]).expanduser().resolve()
    if db.is_file():
        with open(db, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
        if head and head != SQLITE_MAGIC:
            raise store_error(uri, DAMAGED)
    folder = db.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise store_error(uri, f"{folder} is a file, not a folder")
    # SQLite writes the database and, beside it, its journal: both the file and its folder must be writable
    for path in (db, folder) if db.exists() else (folder,):
        if not os.access(path, os.W_OK):
            raise store_error(uri, f"{path} is not writable")


def store_error(uri: str, err: BaseException | str) -> TransferError:
    """What a user can do about a store MLflow cannot open or write: never touch it, point elsewhere."""
    reason = err if isinstance(err, str) else " ".join(str(getattr(err, "orig", None) or err).split())[:300]
    where = uri[len(SQLITE):] if uri.startswith(SQLITE) else uri
    if reason == DAMAGED or "not a database" in reason or "malformed" in reason:
        fix = (f"move the damaged file aside (mv '{where}' '{where}.damaged') or use another store: "
               "logger.tracking_uri=sqlite:///<folder>/mlflow.db; or train without MLflow: logger=csv")
    elif "filesystem tracking backend" in reason:  # MLflow 3 refuses folder (./mlruns) stores for new runs
        fix = ("use a SQLite store: logger.tracking_uri=sqlite:///<folder>/mlflow.db (`mlflow migrate-filestore` "
               "moves a folder store's runs into one); or train without MLflow: logger=csv")
    else:
        fix = ("use a store you may write to: logger.tracking_uri=sqlite:///<writable folder>/mlflow.db; "
               "or train without MLflow: logger=csv")
    what = reason if isinstance(err, str) else f"{type(err).__name__}: {reason}"
    return TransferError(f"cannot use the MLflow store {where}: {what}", fix)


__all__ = ["SQLITE", "default_tracking_uri", "run_store", "check_sqlite_store", "store_error"]
