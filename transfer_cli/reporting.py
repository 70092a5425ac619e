"""What a run prints: the composed config as a tree at the start, a results table at the end."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree

console = Console()

CONFIG_ORDER = ("data", "model", "transfer", "augmentation", "optimizer", "scheduler", "trainer", "logger",
                "callbacks", "paths")


def print_config_tree(cfg: Any) -> None:
    """The run's config (the schema's TrainConfig), group by group, as YAML."""
    tree = Tree(f"[bold]config[/] (name={cfg.name}, seed={cfg.seed})", guide_style="dim")
    for key in CONFIG_ORDER:
        if hasattr(cfg, key):
            branch = tree.add(f"[bold cyan]{key}[/]")
            text = OmegaConf.to_yaml(OmegaConf.structured(getattr(cfg, key))).rstrip() or "{}"
            branch.add(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    console.print(tree)


def print_summary(summary: dict) -> None:
    table = Table(title=f"transfer train: {summary.get('name', '')}", show_header=False, title_style="bold")
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # paths are the point of this table: wrap them, never cut them
    # The test split first: the headline number, on images that chose nothing (val picked the epoch or strength).
    for key in ("test_mAP", "test_acc", "val_mAP", "val_f1", "val_acc", "epochs", "num_classes", "wall_time_s",
                "first_step_latency_s", "feature_cache", "bad_images", "best_checkpoint", "run_dir"):
        value = summary.get(key)
        if value is None:
            continue
        if isinstance(value, float):
            digits = 4 if key.endswith(("acc", "mAP", "f1")) else 2 if key.endswith("latency_s") else 1
            value = f"{value:.{digits}f}"
        table.add_row(key, str(value))
    probe = summary.get("probe")
    if probe:
        table.add_row("head", f"{probe['use']}: linear probe, L2 strength {probe['strength']:.3g} chosen on "
                              f"{probe['chosen_on'].split(' (')[0]}, fitted in {probe['fit_seconds']:.2f} s")
    console.print(table)
