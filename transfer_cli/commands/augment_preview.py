"""`transfer augment-preview [overrides] [n=16] [output=augment_preview.png]`: what the training images look like.

Writes a PNG grid of `n` training samples of the configured data, each as the model sees it at evaluation
(left) and after the configured augmentation, Mixup/CutMix included (right), un-normalized for display.
The heavy imports (torch, timm, matplotlib) happen inside `augment_preview`, after the config has composed, so
a mistyped override fails as fast as it does for `transfer train`.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from transfer_cli.config.args import ANY_OVERRIDE, POSITIVE_INT, Option, parse_command_args, take_run_dir
from transfer_cli.outputs import output_file
from transfer_cli.config.compose import compose
from transfer_cli.config.resolve import replace_at, resolve_run
from transfer_cli.errors import TransferError

PAIRS_PER_ROW = 4


DEFAULT_NAME = "augment_preview.png"
FORMATS = (".png", ".jpg", ".jpeg", ".pdf", ".svg")  # what matplotlib writes
OPTIONS = {
    "n": Option(POSITIVE_INT, 16, help="a positive number of samples"),
    "output": Option(str, None, help="the image to write (a folder: <folder>/augment_preview.png)",
                     example=DEFAULT_NAME),
}


def parse_args(args: list[str]) -> tuple[int, Path, list[str]]:
    """(n, output, the remaining Hydra overrides); `n=` and `output=` belong to this command, not the config;
    hydra.run.dir=DIR means DIR/augment_preview.png."""
    run_dir, args = take_run_dir(args)
    values, overrides = parse_command_args("augment-preview", args, OPTIONS, ANY_OVERRIDE)
    if values["output"] == "":
        raise TransferError("output= names no file", f"use e.g. output={DEFAULT_NAME}")
    chosen = values["output"] or run_dir or DEFAULT_NAME
    if Path(chosen).suffix.lower() not in FORMATS and not Path(chosen).expanduser().is_dir() and chosen != run_dir:
        raise TransferError(f"output={chosen}: an image file is written ({', '.join(FORMATS)})",
                            f"output={Path(chosen).with_suffix('.png')}")
    if run_dir is not None and not values["output"]:
        Path(run_dir).expanduser().mkdir(parents=True, exist_ok=True)
    output = output_file(chosen, DEFAULT_NAME, ours=lambda p: p.suffix.lower() in FORMATS)
    return int(values["n"]), output, overrides


def _display(image: Any, mean: Any, std: Any) -> Any:
    """A normalized (3, H, W) tensor as an (H, W, 3) array in [0, 1]."""
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _mix_title(soft: Any, class_names: list[str]) -> str:
    top = soft.topk(min(2, len(class_names)))
    parts = [f"{class_names[int(i)]} {float(p):.2f}" for p, i in zip(top.values, top.indices) if float(p) >= 0.05]
    return " / ".join(parts)


def augment_preview(args: list[str]) -> Path:
    """Compose the config from `args`, write the grid, return its path."""
    n, output, overrides = parse_args(args)
    cfg = resolve_run(compose(overrides))

    import numpy as np
    import torch
    from matplotlib.figure import Figure

    from transfer_cli.assembly.run import build_data
    from transfer_cli.data.images import BadImage, ImageDataset
    from transfer_cli.data.transforms import build_transform
    from transfer_cli.plots import save_figure
    from transfer_cli.training.mixing import build_mixup, mix_batch

    # Only the preprocessing is needed, not the weights: nothing to download (a weights file or a named source
    # still loads, and a named source's preprocessing still applies).
    cfg = replace_at(cfg, {"model.pretrained": False})
    with tempfile.TemporaryDirectory() as run_dir:
        _, _, images, _ = build_data(cfg, Path(run_dir))
        samples = images.samples("train")
    rng = np.random.default_rng(cfg.seed)
    chosen = [samples[i] for i in rng.choice(len(samples), size=n, replace=n > len(samples))]
    torch.manual_seed(cfg.seed)
    plain = ImageDataset(chosen, build_transform(images.data_config, cfg.augmentation, train=False))
    augmented = ImageDataset(chosen, build_transform(images.data_config, cfg.augmentation, train=True))
    pairs = [(plain[i], augmented[i]) for i in range(n)]
    pairs = [(a, b) for a, b in pairs if not isinstance(a, BadImage) and not isinstance(b, BadImage)]
    if not pairs:
        raise TransferError("none of the chosen training images could be read", "check the data: transfer train")

    originals = torch.stack([a[0] for a, _ in pairs])
    labels = torch.tensor([label for (_, label), _ in pairs])
    batch = torch.stack([b[0] for _, b in pairs])
    names = images.class_names
    titles = [names[int(k)] for k in labels]
    mixup = build_mixup(cfg.augmentation, len(names))
    if mixup is not None:  # what training_step does to a batch, so the grid shows what the model trains on
        np.random.seed(cfg.seed)
        batch, soft = mix_batch(mixup, batch, labels)
        aug_titles = [_mix_title(row, names) for row in soft]
    else:
        aug_titles = titles

    mean = torch.tensor(images.data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(images.data_config["std"]).view(3, 1, 1)
    per_row = min(PAIRS_PER_ROW, len(pairs))
    rows = math.ceil(len(pairs) / per_row)
    fig = Figure(figsize=(2 * per_row * 1.6, rows * 1.8), layout="constrained")
    axes = fig.subplots(rows, 2 * per_row, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for k in range(len(pairs)):
        row, col = divmod(k, per_row)
        for j, (image, title) in enumerate(((originals[k], titles[k]), (batch[k], aug_titles[k]))):
            ax = axes[row, 2 * col + j]
            ax.imshow(_display(image, mean, std))
            ax.set_title(title, fontsize=7)
    h, w = images.image_shape[1:]
    fig.suptitle(f"augmentation={cfg.augmentation.name}: original | augmented ({w}x{h}, {len(pairs)} samples)",
                 fontsize=9)
    return save_figure(fig, output, dpi=100)


def augment_preview_command(args: list[str]) -> None:
    print(f"wrote {augment_preview(args)}")


__all__ = ["augment_preview", "augment_preview_command", "parse_args"]
