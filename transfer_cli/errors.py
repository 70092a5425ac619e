"""User-facing errors: each one says what went wrong and how to fix it, printed without a traceback."""

from __future__ import annotations

from typing import Iterable


class TransferError(Exception):
    """A problem with the user's input (config, data, weights) rather than a bug.

    The CLI prints these without a traceback: `message` says what is wrong, `fix` says what to type.
    """

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(message if fix is None else f"{message}\n  fix: {fix}")


# OS errors that say something about where the user pointed the tool (a full disk, a read-only or foreign folder),
# not about a bug: printed as error/fix like a TransferError.
USER_ERRNOS = {"ENOSPC": "free some disk space", "EDQUOT": "free some of your disk quota",
               "EROFS": "choose a writable folder", "EACCES": "choose a folder you may write to",
               "ENAMETOOLONG": "choose a shorter path"}


def from_os_error(err: OSError, fix: str | None = None) -> TransferError | None:
    """A TransferError for an OSError the user can fix (USER_ERRNOS), else None (a bug: keep its traceback)."""
    import errno as errno_names

    name = errno_names.errorcode.get(err.errno or 0, "")
    if name not in USER_ERRNOS:
        return None
    where = f" {err.filename}" if err.filename else ""
    return TransferError(f"cannot write{where}: {err.strerror}", fix or USER_ERRNOS[name])


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates a mistyped `word` most likely meant, for a did-you-mean."""
    import difflib

    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)


def print_error(err: TransferError) -> None:
    """`error: ...` and `fix: ...` on stderr, in colour where the terminal has it; with TRANSFER_DEBUG=1 the
    traceback of what raised it first."""
    import os

    from rich.console import Console

    if os.environ.get("TRANSFER_DEBUG", "") not in ("", "0"):
        import traceback

        traceback.print_exception(err)
    from rich.markup import escape  # a message may hold brackets, e.g. pip install 'transfer-cli[slurm]'

    console = Console(stderr=True)
    # soft_wrap: one line each, whatever the terminal's width (a fix is often a command to copy)
    console.print(f"[bold red]error:[/] {escape(err.message)}", highlight=False, soft_wrap=True)
    if err.fix:
        console.print(f"[bold green]fix:[/] {escape(err.fix)}", highlight=False, soft_wrap=True)
