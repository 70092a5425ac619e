"""The files that show an evaluation's mistakes: misclassified.csv (worst first), top_losses.png (a grid of the
highest-loss images with their true and predicted labels) and, with `cam=k`, Grad-CAM overlays of the k worst.

Images are shown as the network saw them: the checkpoint's evaluation preprocessing (resize, centre crop),
un-normalized for display.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

from transfer_cli.atomic import atomic_write_text
from transfer_cli.training.mistakes import ImageOutcome

MISCLASSIFIED_NAME = "misclassified.csv"
TOP_LOSSES_NAME = "top_losses.png"
CAM_NAME = "gradcam_top_losses.png"
CSV_COLUMNS = ("path", "true", "predicted", "confidence", "true_probability", "loss")


def write_misclassified(outcomes: Sequence[ImageOutcome], paths: Sequence[str], output: Path) -> int:
    """The misclassified images, the highest loss first; returns how many there are."""
    wrong = [o for o in outcomes if o.wrong]
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for o in wrong:
        writer.writerow([paths[o.index], ";".join(o.true), ";".join(o.predicted), f"{o.confidence:.6f}",
                         f"{o.true_probability:.6f}", f"{o.loss:.6f}"])
    atomic_write_text(output, text.getvalue())
    return len(wrong)


def model_view(path: str, data_config: dict) -> Any:
    """(the normalized input tensor, the same as an (H, W, 3) array in [0, 1] for display)."""
    import torch

    from transfer_cli.data.images import load_rgb
    from transfer_cli.data.transforms import eval_transform

    tensor = eval_transform(data_config)(load_rgb(path))
    mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(data_config["std"], dtype=torch.float32).view(-1, 1, 1)
    return tensor, (tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _title(o: ImageOutcome) -> str:
    true, predicted = ";".join(o.true) or "(none)", ";".join(o.predicted) or "(none)"
    return f"true {true}\npred {predicted} ({o.confidence:.2f})\nloss {o.loss:.2f}"


def write_top_losses(outcomes: Sequence[ImageOutcome], paths: Sequence[str], data_config: dict, output: Path,
                     title: str) -> Path:
    from transfer_cli.report_plots import write_image_grid

    tiles = [{"image": model_view(paths[o.index], data_config)[1], "title": _title(o), "bad": o.wrong}
             for o in outcomes]
    return write_image_grid(tiles, output, title=title)


def cam_images(model: Any, data_config: dict, paths: Sequence[str], targets: Sequence[int], device: Any,
               layer: str | None = None, batch_size: int = 16) -> list[Any]:
    """Grad-CAM overlays ((H, W, 3) arrays in [0, 1]) of `paths` for the classes `targets`."""
    import torch

    from transfer_cli.models.gradcam import gradcam_maps, overlay

    out = []
    for start in range(0, len(paths), batch_size):
        views = [model_view(p, data_config) for p in paths[start:start + batch_size]]
        batch = torch.stack([tensor for tensor, _ in views]).to(device)
        maps = gradcam_maps(model, batch, targets[start:start + batch_size], layer)
        out += [overlay(shown, cam) for (_, shown), cam in zip(views, maps)]
    return out


def write_cam_grid(model: Any, outcomes: Sequence[ImageOutcome], paths: Sequence[str], names: Sequence[str],
                   data_config: dict, device: Any, output: Path, title: str) -> Path:
    """The worst images beside their Grad-CAM for the class the model chose (multi-label: its worst label)."""
    from transfer_cli.report_plots import write_image_grid

    overlays = cam_images(model, data_config, [paths[o.index] for o in outcomes], [o.target for o in outcomes],
                          device)
    tiles = []
    for o, cam in zip(outcomes, overlays):
        tiles.append({"image": model_view(paths[o.index], data_config)[1], "title": _title(o), "bad": o.wrong})
        tiles.append({"image": cam, "title": f"Grad-CAM: {names[o.target]}"})
    return write_image_grid(tiles, output, title=title, columns=4)


__all__ = ["write_misclassified", "write_top_losses", "write_cam_grid", "cam_images", "model_view",
           "MISCLASSIFIED_NAME", "TOP_LOSSES_NAME", "CAM_NAME"]
