"""The sweep summary: sweep_summary.csv / .md / .png in the sweep dir, a rich table, and the best run's command.

Built only from the job records on disk (records.py), so the end of a sweep and `transfer sweep-summary` produce
the same thing, also for a sweep that was interrupted.
"""

from __future__ import annotations

import csv
import io
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from transfer_cli.atomic import atomic_write_text
from transfer_cli.errors import TransferError
from transfer_cli.sweeps.records import JobRecord, collect_records

# Overrides that shape the sweep rather than the run: left out of the ready-to-run command.
SWEEP_ONLY_PREFIXES = ("hparams_search=", "hydra/sweeper", "hydra/launcher", "hydra.sweeper", "hydra.launcher")


@dataclass
class SweepSummary:
    sweep_dir: Path
    monitor: str
    mode: str
    records: list[JobRecord]  # best first; jobs without a value (failed, interrupted) last
    swept: list[str]  # override keys whose value differs between jobs
    files: list[Path]
    best_command: Optional[str]

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.status] = out.get(r.status, 0) + 1
        return out


def split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def swept_keys(records: list[JobRecord]) -> list[str]:
    keys: list[str] = []
    for r in records:
        keys += [split_override(o)[0] for o in r.overrides if split_override(o)[0] not in keys]
    values = {k: {dict(map(split_override, r.overrides)).get(k) for r in records} for k in keys}
    return [k for k in keys if len(values[k]) > 1]


def rank(records: list[JobRecord], mode: str) -> list[JobRecord]:
    scored = [r for r in records if r.best is not None and r.status == "ok"]
    rest = [r for r in records if r not in scored]
    scored.sort(key=lambda r: r.best, reverse=(mode == "max"))
    return scored + rest


def train_command(overrides: list[str]) -> str:
    kept = [o for o in overrides if not o.startswith(SWEEP_ONLY_PREFIXES)]
    return " ".join(["transfer train", *(shlex.quote(o) for o in kept)])


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _swept_text(record: JobRecord, swept: list[str]) -> str:
    values = dict(map(split_override, record.overrides))
    shown = [f"{k}={values[k]}" for k in swept if k in values] if swept else record.overrides
    return " ".join(shown)


def _rows(summary: SweepSummary) -> list[dict[str, str]]:
    extra_keys = sorted({k for r in summary.records for k in r.extra})
    rows = []
    for i, r in enumerate(summary.records, 1):
        row = {"rank": str(i) if r.best is not None and r.status == "ok" else "", "job": r.job,
               "overrides": " ".join(r.overrides), "status": r.status, summary.monitor: _fmt(r.best),
               "epochs": "" if r.epochs is None else str(r.epochs), "wall_time_s": _fmt(r.wall_time_s, 1),
               "run_dir": r.run_dir, "error": r.error}
        row.update({k: _fmt(r.extra.get(k)) for k in extra_keys})
        rows.append(row)
    return rows


def write_csv(summary: SweepSummary, path: Path) -> None:
    rows = _rows(summary)
    fields = list(rows[0]) if rows else ["job", "overrides", "status", summary.monitor]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def write_markdown(summary: SweepSummary, path: Path) -> None:
    direction = "higher" if summary.mode == "max" else "lower"
    lines = [f"# Sweep summary: {summary.sweep_dir}", "",
             f"{len(summary.records)} jobs ({', '.join(f'{n} {s}' for s, n in summary.counts.items())}), "
             f"sorted by best `{summary.monitor}` ({direction} is better).", ""]
    if summary.best_command:
        lines += ["Best run:", "", "```bash", summary.best_command, "```", ""]
    header = ["#", "job", "overrides" if not summary.swept else "swept overrides", "status",
              f"best {summary.monitor}", "epochs", "wall time (s)", "run dir", "error"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, r in zip(_rows(summary), summary.records):
        cells = [row["rank"], r.job, _swept_text(r, summary.swept), r.status, row[summary.monitor], row["epochs"],
                 row["wall_time_s"], r.run_dir, r.error.splitlines()[0] if r.error else ""]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def _as_number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def write_plot(summary: SweepSummary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster or in CI
    import matplotlib.pyplot as plt

    from transfer_cli.plots import save_figure

    by_job = sorted(summary.records, key=lambda r: [int(p) if p.isdigit() else p for p in Path(r.job).parts])
    panels = 1 + len(summary.swept)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    # Points, not bars: the y-axis then spans the values, where jobs of a sweep usually differ by a few tenths.
    scored = [(i, r.best) for i, r in enumerate(by_job) if r.best is not None]
    ax.scatter([i for i, _ in scored], [b for _, b in scored], color="tab:blue")
    for i, r in enumerate(by_job):
        if r.status != "ok":  # at the bottom of the axes, whatever the value range
            ax.annotate(r.status, (i, 0.02), xycoords=ax.get_xaxis_transform(), ha="center", va="bottom",
                        rotation=90, fontsize=8, color="tab:red")
    ax.set_xlim(-0.5, len(by_job) - 0.5)
    ax.set_xticks(range(len(by_job)), [r.job for r in by_job])
    ax.set(title=f"best {summary.monitor} per job", xlabel="job", ylabel=summary.monitor)
    for ax, key in zip(axes[0][1:], summary.swept):
        points = [(dict(map(split_override, r.overrides)).get(key, ""), r.best) for r in by_job if r.best is not None]
        labels = sorted({p[0] for p in points}, key=lambda v: (_as_number(v) is None, _as_number(v) or 0, v))
        xs = [labels.index(v) for v, _ in points]
        ax.scatter(xs, [b for _, b in points])
        ax.set_xticks(range(len(labels)), labels, rotation=30 if max(map(len, labels), default=0) > 6 else 0)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set(title=key, xlabel=key, ylabel=summary.monitor)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def print_table(summary: SweepSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep {summary.sweep_dir} — best {summary.monitor} ({summary.mode})")
    for column in ("#", "job", "overrides", "status", summary.monitor, "epochs", "time (s)", "error"):
        table.add_column(column, overflow="fold")
    for row, r in zip(_rows(summary), summary.records):
        style = None if r.status == "ok" else "red"
        table.add_row(row["rank"], r.job, _swept_text(r, summary.swept), r.status, row[summary.monitor],
                      row["epochs"], row["wall_time_s"], r.error.splitlines()[0][:80] if r.error else "", style=style)
    console = Console()
    console.print(table)
    if summary.best_command:
        console.print("best run, ready to train again:", style="bold green")
        console.print(summary.best_command, highlight=False, soft_wrap=True)


def sweep_settings(sweep_dir: Path) -> tuple[str, str]:
    """callbacks.monitor and .mode of the sweep, from the multirun.yaml Hydra saves in the sweep dir."""
    path = sweep_dir / "multirun.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(path)
        monitor, mode = OmegaConf.select(cfg, "callbacks.monitor"), OmegaConf.select(cfg, "callbacks.mode")
        if monitor and mode:
            return str(monitor), str(mode)
    return "val/acc", "max"


def build_summary(sweep_dir: Path, monitor: Optional[str] = None, mode: Optional[str] = None,
                  show: bool = True) -> SweepSummary:
    """Write sweep_summary.{csv,md,png} into `sweep_dir` from its job records, print the table; return it."""
    sweep_dir = Path(sweep_dir).expanduser().resolve()
    if not sweep_dir.is_dir():
        raise TransferError(f"no sweep dir at {sweep_dir}", "pass the dir of a `transfer train -m ...` sweep, "
                                                            "e.g. transfer sweep-summary multirun/demo/<date_time>")
    default_monitor, default_mode = sweep_settings(sweep_dir)
    monitor, mode = monitor or default_monitor, mode or default_mode
    records = collect_records(sweep_dir, monitor, mode)
    if not records:
        raise TransferError(f"{sweep_dir} holds no sweep jobs (no */job.json or */.hydra/overrides.yaml)",
                            "pass the sweep dir itself: the folder with multirun.yaml and the job subdirs 0, 1, ...")
    ranked = rank(records, mode)
    best = ranked[0] if ranked[0].best is not None and ranked[0].status == "ok" else None
    summary = SweepSummary(sweep_dir, monitor, mode, ranked, swept_keys(records), [],
                           train_command(best.overrides) if best else None)
    for name, writer in (("sweep_summary.csv", write_csv), ("sweep_summary.md", write_markdown),
                         ("sweep_summary.png", write_plot)):
        writer(summary, sweep_dir / name)
        summary.files.append(sweep_dir / name)
    if show:
        print_table(summary)
    return summary
