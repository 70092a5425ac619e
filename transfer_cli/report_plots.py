"""The PNGs of the data report and of the mistakes: the class distribution per split, and image grids (the worst
predictions of `transfer eval`, Grad-CAM overlays of `transfer explain`).

matplotlib is imported inside each function (Agg backend, through plots.new_figure), so importing this costs nothing;
every PNG goes through the one atomic write.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from transfer_cli.plots import new_figure, save_figure

CLASS_DISTRIBUTION_NAME = "class_distribution.png"
SPLIT_COLOURS = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868"}
MAX_BAR_CLASSES = 60  # beyond this the largest classes are shown, with a note


def write_class_distribution(report: dict, output: Path) -> Path:
    """Images per class, one bar per split, classes sorted by their training count (largest on top)."""
    import numpy as np

    per_class = report["per_class"]
    names = sorted(report["class_names"], key=lambda c: -per_class["train"].get(c, 0))
    shown = names[:MAX_BAR_CLASSES]
    splits = list(per_class)
    height = max(2.5, 0.3 * len(shown) * max(1, len(splits)) / 2 + 1.2)
    fig = new_figure(figsize=(7.0, min(height, 30.0)))
    ax = fig.subplots()
    y = np.arange(len(shown))
    bar = 0.8 / len(splits)
    for k, split in enumerate(splits):
        values = [per_class[split].get(c, 0) for c in shown]
        bars = ax.barh(y + (k - (len(splits) - 1) / 2) * bar, values, height=bar, label=f"{split} ({sum(values)})",
                       color=SPLIT_COLOURS.get(split))
        if len(shown) <= 30:
            ax.bar_label(bars, padding=2, fontsize=7)
    ax.set_yticks(y, labels=shown)
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="best")
    ratio = report.get("imbalance_ratio")
    title = f"{len(names)} classes; train imbalance (largest/smallest) " + (f"{ratio:g}" if ratio else "unbounded")
    if len(names) > len(shown):
        title += f"; the {len(shown)} largest shown"
    ax.set_title(title, fontsize=10)
    return save_figure(fig, Path(output))


def write_image_grid(tiles: Sequence[dict], output: Path, title: str = "", columns: int = 4) -> Path:
    """Tiles of {"image": (H, W, 3) array in [0, 1], "title": str, "bad": bool (a red title)}."""
    rows = max(1, math.ceil(len(tiles) / columns))
    cols = min(columns, max(1, len(tiles)))
    fig = new_figure(figsize=(2.9 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, tile in zip(axes.flat, tiles):
        ax.imshow(tile["image"])
        ax.set_title(tile["title"], fontsize=8, color="#B00020" if tile.get("bad") else "black")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, Path(output))


__all__ = ["write_class_distribution", "write_image_grid", "CLASS_DISTRIBUTION_NAME"]
