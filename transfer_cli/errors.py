"""User-facing errors: each one says what went wrong and how to fix it."""

from __future__ import annotations


class TransferError(Exception):
    """A problem with the user's input (config, data, weights) rather than a bug.

    The CLI prints these without a traceback: `message` says what is wrong, `fix` says what to type.
    """

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(message if fix is None else f"{message}\n  fix: {fix}")
