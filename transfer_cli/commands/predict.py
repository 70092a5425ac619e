"""`transfer predict ckpt=<run dir|.ckpt|[a,b]|ensemble folder|.onnx|export dir> input=<image|dir|csv> [topk=3]`.

One CSV row per input image: path, label, probability, the top-k labels with their probabilities, and `error`,
which is empty unless the image could not be read (such images get a row, a warning lists them, and the
others are still predicted). Preprocessing and eval.tta are the checkpoint's, as in `transfer eval`.

An ONNX file of `transfer export` (or the folder holding its model.onnx) runs on onnxruntime instead of PyTorch,
with the preprocessing and class names exported with it, through the same reader, loop and CSV; it is the plain
network, so eval.tta does not apply (commands/onnx_model.py). An ensemble (commands/ensemble.py) writes the mean of
its members' probabilities.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from transfer_cli.atomic import atomic_write_text
from transfer_cli.commands.onnx_model import (
    find_onnx,
    read_sidecar,
    require_onnxruntime,
)
from transfer_cli.config.args import BOOL, CHECKPOINTS, POSITIVE_INT, Option, parse_command_args
from transfer_cli.errors import TransferError
from transfer_cli.outputs import output_file

if TYPE_CHECKING:  # the name only: restore.py brings OmegaConf and the model code, loaded when a command runs
    from transfer_cli.commands.restore import Restored

log = logging.getLogger("transfer_cli")
DEFAULT_NAME = "predictions.csv"

OPTIONS = {
    "ckpt": Option(CHECKPOINTS, required=True, help="a run dir, a .ckpt file, [a,b,...] or a folder with ensemble.json "
                   "(an ensemble), an exported .onnx file or its folder",
                   example="outputs/<name>/<date>_<time>"),
    "input": Option(str, required=True, help="an image, a folder of images, or a CSV with a path column",
                    example="images/"),
    "output": Option(str, "predictions.csv", help="the CSV to write (a folder: <folder>/predictions.csv)"),
    "topk": Option(POSITIVE_INT, 3, help="a positive number of labels per row"),
    "calibrated": Option(BOOL, True, help="true or false: the checkpoint's temperature and decision threshold "
                         "(fitted on val), or the raw softmax and the most probable class", example="false"),
}
OVERRIDES = ("eval.", "multilabel_threshold", "data.batch_size", "data.eval_batch_size", "data.num_workers",
             "data.image_size", "data.crop_pct", "data.interpolation", "data.mean", "data.std",
             "trainer.accelerator", "trainer.precision", "trainer.channels_last")
# What applies to an exported ONNX file: how it is fed and where it runs; its preprocessing and precision are fixed.
ONNX_OVERRIDES = ("multilabel_threshold", "data.batch_size", "data.eval_batch_size", "data.num_workers",
                  "trainer.accelerator")


@dataclass
class PredictResult:
    output: Path
    rows: list[dict] = field(default_factory=list)  # one per input, in input order
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of the unreadable inputs


def list_inputs(source: str | Path) -> list[str]:
    """The image paths named by `source`: one image, every image under a folder (sorted, recursive), or the
    `path` column (else the first column) of a CSV, relative to the CSV's folder."""
    from transfer_cli.data.imagefolder import IMG_EXTENSIONS, list_images

    path = Path(source).expanduser()
    if path.is_dir():
        found = list_images(path)
        if not found:
            raise TransferError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {path}",
                                "input=<a folder of images, one image, or a CSV with a path column>")
        return found
    if not path.is_file():
        raise TransferError(f"input={source}: no such file or folder", "input=<an image, a folder or a CSV>")
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            column = "path" if "path" in (reader.fieldnames or []) else (reader.fieldnames or [None])[0]
            if column is None:
                raise TransferError(f"{path} is empty", "a CSV with a header and a path column")
            paths = [row[column] for row in reader if row.get(column)]
        if not paths:
            raise TransferError(f"{path} lists no image paths (column '{column}')", "one image path per row")
        return [str(p if Path(p).is_absolute() else (path.parent / p)) for p in paths]
    return [str(path)]


def input_batches(restored: Restored, paths: list[str]) -> tuple[Any, Any, Callable[[Any], Any]]:
    """(loader, unreadable, prepare) reading `paths` as the checkpoint's network sees them (its eval transform), for
    inference.infer: each sample's label is its position in `paths`, so the readable ones are found again after
    unreadable ones drop out, and `prepare` records those in `unreadable` (a BadImages with room for them all)."""
    return image_batches(paths, restored.data_config, restored.cfg)


def image_batches(paths: list[str], data_config: dict, cfg: Any) -> tuple[Any, Any, Callable[[Any], Any]]:
    """input_batches with the preprocessing `data_config` (input_size, interpolation, crop_pct, mean, std) and the
    loader settings of `cfg` (data.eval_batch_size / batch_size, data.num_workers, seed)."""
    from transfer_cli.data.datamodule import collate_drop_bad
    from transfer_cli.data.images import BadImages, ImageDataset
    from transfer_cli.data.loaders import make_loader, resolve_num_workers
    from transfer_cli.data.transforms import eval_transform

    dataset = ImageDataset([(p, i) for i, p in enumerate(paths)], eval_transform(data_config))
    shape = tuple(int(v) for v in data_config["input_size"])
    loader = make_loader(dataset, int(cfg.data.eval_batch_size),
                         num_workers=resolve_num_workers(cfg.data.num_workers), seed=cfg.seed,
                         collate_fn=partial(collate_drop_bad, image_shape=shape))
    unreadable = BadImages(budget=len(paths))  # every unreadable input is recorded; none stops the command

    def prepare(batch: Any) -> Any:
        unreadable.record([(str(p), str(r)) for p, r in batch.bad])
        return batch.images, batch.labels

    return loader, unreadable, prepare


def predict(ckpt: str | Path, source: str | Path, output: str | Path = "predictions.csv", topk: int = 3,
            overrides: Sequence[str] = (), calibrated: bool = True) -> PredictResult:
    """Predict every image of `source` with the checkpoint (or exported ONNX file) and write the CSV `output`;
    `calibrated`: with the temperature and binary decision threshold fitted on val, where the model holds them."""
    from transfer_cli.commands.members import members_of, single

    members = members_of(ckpt)
    ckpt = single(ckpt)
    onnx_path = find_onnx(ckpt) if members is None else None
    if onnx_path is not None:
        check_onnx_arguments(onnx_path, overrides)  # before torch loads
    paths = list_inputs(source)
    output = output_file(output, DEFAULT_NAME, inputs=[source, *paths], ours=_is_predictions)  # before any work
    if onnx_path is not None:
        return _predict_onnx(onnx_path, paths, output, topk, overrides, calibrated)
    if members is not None:
        return _predict_ensemble(members, paths, output, topk, overrides, calibrated)
    from transfer_cli.commands.calibration_report import stored_calibration
    from transfer_cli.commands.restore import restore

    restored = restore(ckpt, overrides)
    logits, positions, unreadable = _checkpoint_logits(restored, paths)
    return _write_predictions(paths, logits, positions, unreadable, restored.class_names, restored.task,
                              restored.threshold, topk, output, stored_calibration(restored, calibrated))


def _checkpoint_logits(restored: Restored, paths: list[str]) -> tuple[Any, Any, list[tuple[str, str]]]:
    """(logits, positions in `paths`, unreadable (path, reason)) of a restored checkpoint, with its preprocessing,
    eval.tta, precision and layout."""
    from transfer_cli.inference import autocast_for, infer, pick_device, place_model
    from transfer_cli.training.tta import tta_forward

    cfg = restored.cfg
    loader, unreadable, prepare = input_batches(restored, paths)  # every unreadable input gets its row
    device = pick_device(cfg.trainer.accelerator)
    channels_last = bool(cfg.trainer.channels_last)
    model = place_model(restored.model, device, channels_last)
    logits, positions = infer(tta_forward(model, cfg.eval.tta, cfg.eval.multicrop_fraction), loader,
                              device=device, autocast=autocast_for(device, cfg.trainer.precision),
                              channels_last=channels_last, prepare=prepare)
    return logits, positions, unreadable.items


def _predict_ensemble(members: Any, paths: list[str], output: Path, topk: int, overrides: Sequence[str],
                      calibrated: bool) -> PredictResult:
    """predict with several checkpoints (commands/ensemble.py): each member reads the images its own way, and the
    CSV holds the mean of their (calibrated) probabilities; the decision is the most probable class."""
    from transfer_cli.commands.ensemble import restore_ensemble

    ensemble = restore_ensemble(members, overrides)
    outputs = [_checkpoint_logits(m, paths) for m in ensemble.members]
    _, positions, unreadable = outputs[0]
    if any(not p.equal(positions) for _, p, _ in outputs[1:]):  # an unreadable file is unreadable for every member
        raise RuntimeError("the ensemble's members read different images")
    logits = ensemble.logits([z for z, _, _ in outputs], calibrated) if len(positions) else outputs[0][0]
    how = None if ensemble.task == "multilabel" else {
        "temperature": ";".join(f"{t:.6g}" for t in ensemble.temperatures(calibrated)), "decision": "argmax"}
    return _write_predictions(paths, logits, positions, unreadable, ensemble.class_names, ensemble.task,
                              ensemble.threshold, topk, output, how=how, describe_as=ensemble.describe(calibrated))


def check_onnx_arguments(path: Path, overrides: Sequence[str]) -> None:
    """Before torch: onnxruntime is there, the sidecar (if any) reads, and every override applies to an ONNX file."""
    for override in overrides:
        if _key(override) not in ONNX_OVERRIDES:
            raise TransferError(f"{override} does not apply to an exported ONNX file ({path.name}): its preprocessing "
                                "is the one exported with it, it runs in float32, without test-time augmentation",
                                f"drop it, or predict with the checkpoint (ckpt=<run dir>); ONNX takes: "
                                f"{', '.join(o + '=' for o in ONNX_OVERRIDES)}")
    require_onnxruntime()
    read_sidecar(path)


def _predict_onnx(path: Path, paths: list[str], output: Path, topk: int, overrides: Sequence[str],
                  calibrated: bool) -> PredictResult:
    """predict on onnxruntime: the loader settings are the schema's defaults with `overrides` applied."""
    import torch

    from transfer_cli.commands.onnx_model import OUTPUT_NAME, PROBABILITIES_NAME, forward_of, load
    from transfer_cli.commands.restore import apply_overrides
    from transfer_cli.config.resolve import resolve_run
    from transfer_cli.config.schema import structured_schema
    from transfer_cli.inference import infer

    cfg = resolve_run(apply_overrides(structured_schema(), overrides))
    session, metadata = load(path, cfg.trainer.accelerator)
    given = {_key(o) for o in overrides}
    threshold = cfg.multilabel_threshold if "multilabel_threshold" in given else metadata.get("multilabel_threshold",
                                                                                              cfg.multilabel_threshold)
    log.info("predicting with %s on onnxruntime (%s)", path, ", ".join(session.get_providers()))
    loader, unreadable, prepare = image_batches(paths, metadata, cfg)
    output_name = str(metadata.get("output_name") or OUTPUT_NAME)
    outputs, positions = infer(forward_of(session, output_name), loader, device=torch.device("cpu"), prepare=prepare)
    task = str(metadata.get("task") or "multiclass")
    names = list(metadata["class_names"])
    if output_name == PROBABILITIES_NAME:  # an exported ensemble: its members' temperatures are inside the graph
        from transfer_cli.models.ensemble import as_logits

        if not calibrated:
            raise TransferError(f"{path.name} is an exported ensemble: its graph applies the members' temperatures",
                                "drop calibrated=false, or predict with the members' checkpoints: ckpt=[...] "
                                "calibrated=false")
        temps = (metadata.get("ensemble") or {}).get("temperatures") or []
        how = None if task == "multilabel" else {"temperature": ";".join(f"{float(t):.6g}" for t in temps),
                                                 "decision": "argmax"}
        return _write_predictions(paths, as_logits(outputs, task) if len(positions) else outputs, positions,
                                  unreadable.items, names, task, float(threshold), topk, output, how=how,
                                  describe_as=f"an exported ensemble: {metadata.get('output')}")
    # the export's metadata carries the checkpoint's calibration: the network itself gives raw logits
    calibration = metadata.get("calibration") if calibrated and task != "multilabel" else None
    return _write_predictions(paths, outputs, positions, unreadable.items, names, task, float(threshold), topk,
                              output, calibration)


def _key(override: str) -> str:
    from transfer_cli.config.overrides import override_key

    return override_key(override)


def _write_predictions(paths: list[str], logits: Any, positions: Any, bad: list[tuple[str, str]], names: list[str],
                       task: str, threshold: float, topk: int, output: Path, calibration: dict | None = None,
                       how: dict | None = None, describe_as: str | None = None) -> PredictResult:
    """The CSV of one row per path, in input order: the decoded logits at `positions` (divided by the calibration's
    temperature, decided by its threshold), `bad` ones with their error. An ensemble passes its mean as logits, no
    calibration, `how` (its rows' temperature and decision columns) and `describe_as` (the log line)."""
    from transfer_cli.commands.calibration_report import decision_rule, describe
    from transfer_cli.training.predictions import decode_predictions

    if task != "multilabel" or describe_as:
        log.info("predict: %s", describe_as or describe(calibration))
    temperature = float(calibration["temperature"]) if calibration else 1.0
    rule = decision_rule(calibration)
    k = min(int(topk), len(names))
    rows: list[dict | None] = [None] * len(paths)
    predictions = decode_predictions((logits.double() / temperature).float(), names, task, threshold,
                                     binary_rule=rule) if len(positions) else []
    # Every row says how its probabilities and label came about, so a CSV read alone cannot be misread.
    if how is None:
        how = {} if task == "multilabel" else {
            "temperature": f"{temperature:.6g}",
            "decision": "argmax" if rule is None else f"{names[rule[0]]} if p>={rule[1]:.6f}"}
    for index, pred in zip(positions.tolist(), predictions):
        rows[index] = {**_row(paths[index], pred, names, task, k), **how}
    position = {p: i for i, p in enumerate(paths)}
    for path, reason in bad:
        rows[position[path]] = {"path": path, "error": reason}
    if bad:
        log.warning("%d unreadable image(s), listed in %s (column error):\n%s", len(bad), output,
                    "\n".join(f"    {p}: {r}" for p, r in bad))
    if len(bad) == len(paths):
        raise TransferError(f"none of the {len(paths)} image(s) could be read (first: {bad[0][0]}: {bad[0][1]})",
                            "check the input: JPEG, PNG and the other formats Pillow reads")
    result = PredictResult(Path(output), [r for r in rows if r is not None], bad)
    _write_csv(result.output, result.rows, k, list(how))
    return result


def _is_predictions(path: Path) -> bool:
    """A CSV this command wrote (its header), which a new prediction may replace."""
    try:
        with open(path, newline="") as f:
            return f.readline().startswith("path,label,probability")
    except (OSError, UnicodeDecodeError):
        return False


def _row(path: str, pred: Any, names: Sequence[str], task: str, k: int) -> dict:
    scores = pred.scores
    top = sorted(range(len(names)), key=lambda i: -scores[i])[:k]
    row = {"path": path, "label": ";".join(pred.labels) if task == "multilabel" else pred.labels[0]}
    # multilabel: the probability of each predicted label, in the same order; multiclass: the top class's
    chosen = [scores[names.index(label)] for label in pred.labels]
    row["probability"] = ";".join(f"{p:.6f}" for p in chosen)
    for rank, i in enumerate(top, start=1):
        row[f"top{rank}_label"] = names[i]
        row[f"top{rank}_prob"] = f"{scores[i]:.6f}"
    row["error"] = ""
    return row


def _write_csv(output: Path, rows: list[dict], k: int, extra: Sequence[str] = ()) -> None:
    columns = ["path", "label", "probability"]
    for rank in range(1, k + 1):
        columns += [f"top{rank}_label", f"top{rank}_prob"]
    columns += [*extra, "error"]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(output, text.getvalue())


def predict_command(args: list[str]) -> None:
    options, overrides = parse_command_args("predict", args, OPTIONS, OVERRIDES)
    result = predict(options["ckpt"], options["input"], options["output"], options["topk"], overrides,
                     calibrated=options["calibrated"])
    good = len(result.rows) - len(result.bad)
    print(f"predicted {good} image(s)" + (f", {len(result.bad)} unreadable" if result.bad else "")
          + f": {result.output}")


__all__ = ["predict", "predict_command", "list_inputs", "input_batches", "image_batches", "PredictResult", "OPTIONS",
           "OVERRIDES", "ONNX_OVERRIDES"]
