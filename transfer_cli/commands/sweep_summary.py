"""`transfer sweep-summary <sweep dir>`: rebuild a sweep's ranked summary from its job records (no torch)."""

from __future__ import annotations

from transfer_cli.errors import TransferError


def sweep_summary_command(args: list[str]) -> None:
    from transfer_cli.sweeps.summary import build_summary  # records, CSV, matplotlib

    if len(args) != 1 or "=" in args[0]:
        raise TransferError("sweep-summary takes one argument: the sweep dir",
                            "transfer sweep-summary multirun/<name>/<date_time>")
    summary = build_summary(args[0])
    print("wrote " + ", ".join(str(p) for p in summary.files))
