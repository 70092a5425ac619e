"""The PNGs a run and an evaluation leave behind: training curves from metrics.csv, and the confusion matrix.

matplotlib is imported inside each function, with the Agg backend (files only, no display), so importing
this module costs nothing.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

CURVES_NAME = "curves.png"
CONFUSION_NAME = "confusion_matrix.png"
PROBE_CURVE_NAME = "probe_curve.png"
RELIABILITY_NAME = "reliability.png"
# Panels of curves.png: (title, [(metrics.csv column, legend label)]); a column that the run never logged is skipped.
CURVE_PANELS = (
    ("loss", [("train/loss_epoch", "train"), ("val/loss", "val")]),
    ("accuracy", [("train/acc", "train"), ("val/acc", "val"), ("val/mAP", "val mAP"), ("val/f1", "val F1")]),
)


def new_figure(**kwargs: Any) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # not pyplot: no global figure registry to leak figures into

    return Figure(layout="constrained", **kwargs)


def save_figure(fig: Any, output: Path, dpi: int = 110, **kwargs: Any) -> Path:
    """`fig` as an image file (its format from the suffix), written atomically like every file the tool writes."""
    import io

    from transfer_cli.atomic import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format=(Path(output).suffix.lstrip(".") or "png").lower(), dpi=dpi, **kwargs)
    return atomic_write_bytes(output, buffer.getvalue())


def epoch_series(metrics_csv: Path) -> dict[str, dict[int, float]]:
    """{column: {epoch: value}} of every numeric column; the last value an epoch logged wins, so a resumed run
    that appended to the file (and re-logged its interrupted epoch) reads as one run."""
    series: dict[str, dict[int, float]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            try:
                epoch = int(float(row.get("epoch") or ""))
            except ValueError:
                continue
            for key, text in row.items():
                if key in ("epoch", "step") or not text:
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue
                if math.isfinite(value):
                    series.setdefault(key, {})[epoch] = value
    return series


def write_curves(metrics_csv: Path, output: Path | None = None, title: str = "") -> Path | None:
    """curves.png (loss and accuracy per epoch, train and val) beside metrics.csv; None when no epoch ended."""
    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        return None
    series = epoch_series(metrics_csv)
    panels = [(name, [(series[col], label) for col, label in cols if series.get(col)]) for name, cols in CURVE_PANELS]
    panels = [(name, lines) for name, lines in panels if lines]
    if not panels:
        return None
    fig = new_figure(figsize=(5.0 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, lines) in zip(axes, panels):
        for points, label in lines:
            epochs = sorted(points)
            # Epochs count from 1 on the axis, as the progress bar shows them.
            ax.plot([e + 1 for e in epochs], [points[e] for e in epochs], marker="o", markersize=3, label=label)
        ax.xaxis.get_major_locator().set_params(integer=True)  # no epoch 1.5
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title, fontsize=10)
    output = Path(output) if output is not None else metrics_csv.parent / CURVES_NAME
    save_figure(fig, output)
    return output


def write_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], output: Path,
                           title: str = "") -> Path:
    """A (true x predicted) count matrix as a heatmap; colours are row-normalized (recall per class), so a
    rare class's mistakes stay visible next to a frequent class, and each cell prints its count."""
    import numpy as np

    counts = np.asarray(matrix, dtype=np.int64)
    n = len(class_names)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    side = min(2.0 + 0.55 * n, 24.0)
    fig = new_figure(figsize=(side + 1.5, side))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), labels=list(class_names), rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:  # beyond that the numbers would not fit in the cells
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title, fontsize=10)
    output = Path(output)
    save_figure(fig, output)
    return output


def write_label_matrices(matrices: Sequence[Any], class_names: Sequence[str], output: Path, title: str = "") -> Path:
    """Multi-label: one 2x2 (true absent/present x predicted absent/present) matrix per label, side by side."""
    import numpy as np

    n = len(class_names)
    cols = min(n, 6)
    rows = math.ceil(n / cols)
    fig = new_figure(figsize=(2.2 * cols, 2.3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for k, name in enumerate(class_names):
        counts = np.asarray(matrices[k], dtype=np.int64)
        ax = axes.flat[k]
        ax.set_axis_on()
        ax.imshow(counts, cmap="Blues")
        ax.set_xticks([0, 1], labels=["no", "yes"])
        ax.set_yticks([0, 1], labels=["no", "yes"])
        ax.set_title(name, fontsize=9)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if counts[i, j] > counts.max() / 2 else "black")
    fig.supxlabel("predicted")
    fig.supylabel("true")
    if title:
        fig.suptitle(title, fontsize=10)
    output = Path(output)
    save_figure(fig, output)
    return output


def write_reliability(curves: Sequence[tuple[str, Any]], output: Path, title: str = "") -> Path:
    """A reliability diagram: per confidence bin, the accuracy against the mean confidence (the diagonal is
    perfect calibration), one line per (label, training.calibration.ReliabilityBins); below it, how many images
    each bin holds, since a bin of three images says little."""
    fig = new_figure(figsize=(5.0, 5.6))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for k, (label, bins) in enumerate(curves):
        points = [(c, a) for c, a in zip(bins.confidence, bins.accuracy) if c is not None]
        top.plot([c for c, _ in points], [a for _, a in points], marker="o", markersize=4, label=label)
        width = (bins.edges[1] - bins.edges[0]) / max(1, len(curves))
        lefts = [e + k * width for e in bins.edges[:-1]]
        bottom.bar(lefts, bins.counts, width=width, align="edge", alpha=0.7, label=label)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(fontsize=8, loc="upper left")
    bottom.set_xlabel("confidence (top class probability)")
    bottom.set_ylabel("images")
    if title:
        top.set_title(title, fontsize=10)
    output = Path(output)
    save_figure(fig, output)
    return output


def write_probe_curve(result: Any, output: Path, title: str = "") -> Path:
    """The linear probe's strength sweep (a training.probe.ProbeResult): val score and val loss against the L2
    strength on a log axis, the chosen strength marked, so a choice at the grid's edge is plain to see."""
    fig = new_figure(figsize=(6.0, 3.6))
    ax = fig.subplots()
    chosen = result.strengths.index(result.strength)
    ax.plot(result.strengths, result.val_scores, marker="o", markersize=3, color="C0", label=f"val {result.metric}")
    ax.set_xscale("log")
    ax.set_xlabel("L2 strength")
    ax.set_ylabel(f"val {result.metric}", color="C0")
    ax.grid(alpha=0.3)
    loss_ax = ax.twinx()
    loss_ax.plot(result.strengths, result.val_losses, marker="s", markersize=3, color="C1", label="val loss")
    loss_ax.set_ylabel("val loss", color="C1")
    ax.axvline(result.strength, color="C2", linestyle="--",
               label=f"chosen {result.strength:.3g}: {result.metric} {result.val_scores[chosen]:.4f}")
    ax.legend(handles=ax.get_legend_handles_labels()[0] + loss_ax.get_legend_handles_labels()[0], fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, Path(output))


def write_screen_plot(rows: Sequence[Any], output: Path) -> Path:
    """`transfer screen`: each candidate's linear-probe val score as a bar, best at the top, its feature time
    beside it (commands/screen.py ScreenRow)."""
    rows = list(rows)
    fig = new_figure(figsize=(8.0, 1.2 + 0.32 * len(rows)))
    ax = fig.subplots()
    labels = [r.label for r in rows][::-1]
    scores = [r.val_score for r in rows][::-1]
    bars = ax.barh(range(len(rows)), scores, color=["C2" if i == len(rows) - 1 else "C0" for i in range(len(rows))])
    ax.set_yticks(range(len(rows)), labels=labels, fontsize=8)
    low, high = (min(scores), max(scores)) if scores else (0.0, 1.0)
    ax.set_xlim(max(0.0, low - 0.1 * (1 - low) - 0.02), min(1.0, high + 0.4 * (high - low) + 0.03))
    for bar, row in zip(bars, rows[::-1]):
        note = "cached" if row.images_per_s is None else f"{row.images_per_s:.0f} img/s"
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {row.val_score:.4f} ({note})",
                va="center", fontsize=7)
    metric = rows[0].metric if rows else "accuracy"
    ax.set_xlabel(f"linear-probe val {metric}")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("transfer screen: backbones and preprocessing, by a converged linear probe", fontsize=10)
    return save_figure(fig, Path(output))


__all__ = ["new_figure", "save_figure", "write_curves", "write_confusion_matrix", "write_label_matrices", "write_probe_curve", "write_screen_plot",
           "epoch_series",
           "CURVES_NAME", "CONFUSION_NAME", "PROBE_CURVE_NAME"]
