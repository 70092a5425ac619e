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


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates a mistyped `word` most likely meant, for a did-you-mean."""
    import difflib

    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)


def print_error(err: TransferError) -> None:
    """`error: ...` and `fix: ...` on stderr, in colour where the terminal has it."""
    from rich.console import Console
    from rich.markup import escape  # a message may hold brackets, e.g. pip install 'transfer-cli[slurm]'

    console = Console(stderr=True)
    console.print(f"[bold red]error:[/] {escape(err.message)}", highlight=False)
    if err.fix:
        console.print(f"[bold green]fix:[/] {escape(err.fix)}", highlight=False)
