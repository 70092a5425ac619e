"""`transfer data-report [data overrides] [output=DIR]`: what the data set holds, before a first run.

Images per class and split, the class imbalance, image sizes and modes (from the headers), unreadable files and
byte-identical files in two splits; data_report.json and class_distribution.png. The data overrides are the
train command's (data=..., data.root=..., experiment=..., task=...). No torch import: it runs in seconds. Every
training run starts with the short form (counts, imbalance, duplicates; no headers) in its run dir.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from transfer_cli.atomic import atomic_write_json
from transfer_cli.config.args import Option, parse_command_args
from transfer_cli.data.report import data_report, report_lines
from transfer_cli.data.splits import DataSplits

log = logging.getLogger("transfer_cli")

REPORT_NAME = "data_report.json"
OPTIONS = {
    "output": Option(str, None, help="the folder for data_report.json and class_distribution.png "
                     "(default: outputs/data_report/<date>_<time>)", example="data_report"),
}
OVERRIDES = ("data", "data.", "task", "experiment")  # what picks the data, as in `transfer train`


def write_data_report(splits: DataSplits, out_dir: Path, headers: bool = True) -> dict[str, Any]:
    """data_report.json and class_distribution.png in `out_dir`; returns the report (with the files' paths)."""
    from transfer_cli.report_plots import CLASS_DISTRIBUTION_NAME, write_class_distribution

    report = data_report(splits, headers=headers)
    out_dir.mkdir(parents=True, exist_ok=True)
    report["class_distribution_png"] = str(write_class_distribution(report, out_dir / CLASS_DISTRIBUTION_NAME))
    report["report"] = str(atomic_write_json(out_dir / REPORT_NAME, report))
    return report


def data_report_command(args: list[str]) -> None:
    from transfer_cli.assembly.sources import discover
    from transfer_cli.config.compose import as_schema, compose
    from transfer_cli.outputs import command_dir

    options, overrides = parse_command_args("data-report", args, OPTIONS, OVERRIDES)
    cfg = as_schema(compose(overrides))
    out_dir = command_dir(options["output"], "data_report")  # refused before any work: a file, a run's dir
    started = time.time()
    splits = discover(cfg.data, cfg.task)
    report = write_data_report(splits, out_dir)
    print(f"{report['data']}")
    for line in report_lines(report):
        print(line)
    print(f"wrote {report['report']} and {report['class_distribution_png']} ({time.time() - started:.1f} s)")


__all__ = ["data_report_command", "write_data_report", "REPORT_NAME", "OPTIONS", "OVERRIDES"]
