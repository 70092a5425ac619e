"""`transfer explain ckpt=<run dir|.ckpt> input=<image|dir|csv> [output=DIR] [target=<class>] [layer=<module>]`.

Where the network looks: one PNG per input image, the image as the network sees it beside its Grad-CAM map for
the predicted class (multi-label: the most probable label), or for `target=<class name>`. The predictions come
from the one inference loop (as in `transfer predict`, without test-time augmentation: the map explains the plain
forward pass); the maps from the grad-cam package (models/gradcam.py says which layer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from transfer_cli.config.args import Option, parse_command_args
from transfer_cli.errors import TransferError

log = logging.getLogger("transfer_cli")

OPTIONS = {
    "ckpt": Option(str, required=True, help="a run dir or a .ckpt file", example="outputs/<name>/<date>_<time>"),
    "input": Option(str, required=True, help="an image, a folder of images, or a CSV with a path column",
                    example="images/"),
    "output": Option(str, None, help="the folder for the PNGs (default: <run dir>/explain)", example="explain"),
    "target": Option(str, None, help="the class whose evidence is shown (default: the predicted one)",
                     example="<class name>"),
    "layer": Option(str, None, help="the backbone module whose activations are weighed (default: its last stage)",
                    example="layer4"),
}
OVERRIDES = ("data.batch_size", "data.eval_batch_size", "data.num_workers", "data.image_size", "data.crop_pct",
             "data.interpolation", "data.mean", "data.std", "trainer.accelerator", "multilabel_threshold")


@dataclass
class Explained:
    output: Path
    files: list[Path] = field(default_factory=list)  # one PNG per readable input, in input order
    predicted: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)


def explain(ckpt: str | Path, source: str | Path, output: str | Path | None = None, target: str | None = None,
            layer: str | None = None, overrides: Sequence[str] = ()) -> Explained:
    from transfer_cli.commands.mistakes import cam_images, model_view
    from transfer_cli.commands.predict import input_batches, list_inputs
    from transfer_cli.commands.restore import restore
    from transfer_cli.inference import infer, pick_device, place_model
    from transfer_cli.models.gradcam import require_gradcam
    from transfer_cli.outputs import output_dir
    from transfer_cli.report_plots import write_image_grid
    from transfer_cli.training.predictions import decode_predictions

    require_gradcam()
    paths = list_inputs(source)
    chosen = output_dir(output) if output else None  # refused before any work: a file, a run's dir
    restored = restore(ckpt, overrides)
    cfg, names = restored.cfg, restored.class_names
    if target is not None and target not in names:
        from transfer_cli.errors import close_matches

        close = close_matches(target, names, n=1)
        raise TransferError(f"target={target} is not a class of the checkpoint" + (f"; did you mean {close[0]}?"
                                                                                     if close else ""),
                            f"one of: {', '.join(names)} (or leave target= out for the predicted class)")
    out_dir = chosen or restored.run_dir / "explain"
    loader, unreadable, prepare = input_batches(restored, paths)
    device = pick_device(cfg.trainer.accelerator)
    model = place_model(restored.model, device, channels_last=False)
    logits, positions = infer(model, loader, device=device, prepare=prepare)
    if not len(positions):
        raise TransferError(f"none of the {len(paths)} input image(s) could be read", "check input=")
    predictions = decode_predictions(logits, names, restored.task, restored.threshold)
    readable = [paths[i] for i in positions.tolist()]
    chosen = [names.index(target) if target else max(range(len(names)), key=lambda c: p.scores[c])
              for p in predictions]
    result = Explained(out_dir, bad=unreadable.items)
    overlays = cam_images(model, restored.data_config, readable, chosen, device, layer)
    out_dir.mkdir(parents=True, exist_ok=True)
    for n, (path, pred, c, cam) in enumerate(zip(readable, predictions, chosen, overlays)):
        label = ";".join(pred.labels) or "(none)"
        tiles = [{"image": model_view(path, restored.data_config)[1],
                  "title": f"{Path(path).name}\npredicted {label} ({max(pred.scores):.2f})"},
                 {"image": cam, "title": f"Grad-CAM: {names[c]} ({pred.scores[c]:.2f})"}]
        result.files.append(write_image_grid(tiles, out_dir / f"{n:03d}_{Path(path).stem}.png", columns=2))
        result.predicted.append(label)
        result.targets.append(names[c])
    if result.bad:
        log.warning("%d unreadable image(s) skipped:\n%s", len(result.bad),
                    "\n".join(f"    {p}: {r}" for p, r in result.bad))
    return result


def explain_command(args: list[str]) -> None:
    options, overrides = parse_command_args("explain", args, OPTIONS, OVERRIDES)
    result = explain(options["ckpt"], options["input"], options["output"], options["target"], options["layer"],
                     overrides)
    print(f"wrote {len(result.files)} Grad-CAM overlay(s) to {result.output}"
          + (f" ({len(result.bad)} unreadable image(s) skipped)" if result.bad else ""))


__all__ = ["explain", "explain_command", "Explained", "OPTIONS", "OVERRIDES"]
