"""`transfer export ckpt=<run dir|.ckpt|[a,b]|ensemble folder> format=onnx|torchscript [output=FILE] [rtol=..] [atol=..]`.

Writes the trained network (input: normalized NCHW float32 images, any batch size; output: logits) with the
preprocessing a caller must apply and the class names: inside the file (ONNX metadata_props; TorchScript
extra file `transfer.json`) and in a sidecar `<output>.json`. Then runs the exported file (onnxruntime;
torch.jit.load) and PyTorch on the same sample batches and fails unless every logit is within
atol + rtol * |logit| of PyTorch's (numpy.allclose; commands/check_inputs.py says why not atol alone).

An ensemble (commands/ensemble.py) whose members share one preprocessing exports as one graph whose output,
`probabilities`, is the weighted mean of the members' probabilities at their temperatures (models/ensemble.py).

ONNX goes through torch.onnx.export's default exporter (torch.export based, needs onnxscript); a network it
cannot capture falls back to the TorchScript-based exporter, with a warning. Either way the check decides.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transfer_cli.atomic import TEMP_SUFFIX, atomic_write_json
from transfer_cli.commands import onnx_model
from transfer_cli.commands.check_inputs import (
    ATOL,
    CHECK_BATCHES,
    RTOL,
    TOLERANCE_OPTIONS,
    Agreement,
    compare,
    sample_inputs,
)
from transfer_cli.config.args import CHECKPOINTS, Option, parse_command_args
from transfer_cli.errors import TransferError
from transfer_cli.outputs import output_dir, output_file

if TYPE_CHECKING:  # the name only: restore.py brings OmegaConf and the model code, loaded when a command runs
    from transfer_cli.commands.restore import Restored

log = logging.getLogger("transfer_cli")

FORMATS = ("onnx", "torchscript", "timm")  # timm: a folder timm.create_model("local-dir:...") loads (commands/hub.py)
DEFAULT_NAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
METADATA_FILE = "transfer.json"  # the TorchScript extra file; the ONNX metadata_props key is "transfer"
INPUT_NAME, OUTPUT_NAME = onnx_model.INPUT_NAME, onnx_model.OUTPUT_NAME
OPTIONS = {
    "ckpt": Option(CHECKPOINTS, required=True, help="a run dir, a .ckpt file, [a,b,...] or a folder with ensemble.json",
                   example="outputs/<name>/<date>_<time>"),
    "format": Option(str, "onnx", help="onnx, torchscript or timm", choices=FORMATS),
    "output": Option(str, None, help="the file to write (default: <run dir>/export/model.onnx; a folder: "
                     "<folder>/model.onnx; timm: a folder, default <run dir>/export/timm)", example="model.onnx"),
    **TOLERANCE_OPTIONS,
    "license": Option(str, None, help="format=timm: the model card's licence (default: the data's, if known)"),
}
EXPORT_EXTRA = onnx_model.EXPORT_EXTRA


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    format: str
    agreement: Agreement  # the exported file's outputs against PyTorch's on the check batches
    metadata: dict

    @property
    def max_abs_diff(self) -> float:
        return self.agreement.max_abs_diff


def export_metadata(restored: Restored) -> dict:
    """What a caller needs to feed the exported network and read its output, as plain JSON."""
    dc = restored.data_config
    return {
        "input_name": INPUT_NAME,
        "input_size": [int(v) for v in dc["input_size"]],
        "layout": "NCHW float32, RGB scaled to [0, 1], then (x - mean) / std per channel",
        "mean": [float(v) for v in dc["mean"]],
        "std": [float(v) for v in dc["std"]],
        "interpolation": str(dc.get("interpolation", "bilinear")),
        "crop_pct": float(dc.get("crop_pct") or 1.0),
        "resize": "shorter side to floor(size / crop_pct), then a centre crop of input_size",
        "output_name": OUTPUT_NAME,
        "output": "logits: softmax for class probabilities" if restored.task != "multilabel"
        else "logits: sigmoid per label; a label is predicted at multilabel_threshold",
        "task": restored.task,
        "multilabel_threshold": restored.threshold,
        "class_names": restored.class_names,
        # the exported network gives raw logits: divide them by the temperature (and decide a binary task at the
        # threshold) to get what `transfer predict` reports; null where the run fitted no calibration
        "calibration": _calibration(restored),
        "backbone": restored.meta.get("backbone"),
        "checkpoint": str(restored.checkpoint),
    }


def _calibration(restored: Restored) -> dict | None:
    from transfer_cli.commands.calibration_report import stored_calibration

    block = stored_calibration(restored)
    if block is None:
        return None
    keys = ("temperature", "threshold", "positive_class", "positive_index", "criterion", "target_recall", "images")
    return {k: block.get(k) for k in keys}


def export_onnx(model: Any, example: Any, path: Path, metadata: dict) -> str:
    """Writes `path`; returns which exporter made it."""
    import torch

    onnx_model.require_onnxruntime("onnx", "onnxscript")
    props = {onnx_model.METADATA_KEY: json.dumps(metadata), "class_names": json.dumps(metadata["class_names"]),
             **{k: json.dumps(metadata[k]) for k in ("input_size", "mean", "std", "interpolation", "crop_pct", "task")}}
    output = str(metadata.get("output_name") or OUTPUT_NAME)
    # One file unless the weights are past protobuf's 2 GB limit (then ONNX needs an external data file).
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_800_000_000
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[output],
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), external_data=big,
                                    verbose=False)
        program.model.metadata_props.update(props)
        program.save(str(path), external_data=big)
        return "torch.export"
    except Exception as e:  # an op or control flow torch.export cannot capture
        log.warning("the torch.export-based ONNX exporter failed (%s: %s); using the TorchScript-based one",
                    type(e).__name__, str(e).splitlines()[0][:200])
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                          output_names=[output], dynamic_axes={INPUT_NAME: {0: "batch"}, output: {0: "batch"}})
    proto = onnx.load(str(path))
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return "torchscript-based"


def export_torchscript(model: Any, example: Any, path: Path, metadata: dict) -> str:
    import torch

    with warnings.catch_warnings():  # torch.jit is deprecated upstream but still the format many runtimes load
        warnings.simplefilter("ignore", category=FutureWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})
    return "torch.jit.trace"


def run_torchscript(path: Path, inputs: Any) -> tuple[Any, dict]:
    import torch

    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        with torch.inference_mode():
            outputs = loaded(inputs).numpy()
    return outputs, json.loads(extra[METADATA_FILE])


def export(ckpt: str | Path, format: str = "onnx", output: str | Path | None = None, rtol: float = RTOL,
           atol: float = ATOL, licence: str | None = None) -> ExportResult:
    from transfer_cli.commands.members import members_of, single

    if format not in FORMATS:
        raise TransferError(f"format={format} is not one of {', '.join(FORMATS)}", "format=onnx")
    members = members_of(ckpt)
    if members is not None and format == "timm":
        raise TransferError("format=timm holds one timm model, and an ensemble is several networks",
                            "average same-start runs into one checkpoint and export that (transfer soup ckpt=[...] "
                            "output=<dir>, then transfer export ckpt=<dir> format=timm), or export the ensemble as "
                            "format=onnx|torchscript")
    if format == "onnx":
        onnx_model.require_onnxruntime("onnx", "onnxscript")  # before torch and the checkpoint load
    from transfer_cli.commands.restore import restore
    from transfer_cli.resume.checkpoints import resolve_checkpoint, run_dir_of

    if members is not None:
        return _export_ensemble(members, format, output, rtol, atol)
    source = resolve_checkpoint(single(ckpt))
    if format == "timm":
        from transfer_cli.commands.hub import export_timm

        folder = output_dir(output) if output else None  # refused before any work: a file, a run's dir
        restored = restore(source)
        folder, agreement = export_timm(restored, folder, licence, rtol=rtol, atol=atol)
        metadata = {**export_metadata(restored), "exporter": "timm save_for_hf"}
        return ExportResult(folder, folder / "config.json", format, agreement, metadata)
    default = run_dir_of(source) / "export" / DEFAULT_NAMES[format]
    # Before any work: never over the checkpoint or a file that is not an earlier export (which has its sidecar).
    path = output_file(output or default, DEFAULT_NAMES[format], inputs=[source],
                       ours=lambda p: p.with_name(p.name + ".json").is_file())
    return export_restored(restore(source), format, path, rtol, atol)


def _export_ensemble(members: Any, format: str, output: str | Path | None, rtol: float, atol: float) -> ExportResult:
    """One graph of the members (models/ensemble.py EnsembleNet), refused unless they share the preprocessing; by
    default in <ensemble folder>/export/, or for a list in a new outputs/export/<date>_<time>/."""
    from transfer_cli.commands.ensemble import restore_ensemble, shared_preprocessing
    from transfer_cli.models.ensemble import EnsembleNet
    from transfer_cli.outputs import command_dir
    from transfer_cli.resume.checkpoints import resolve_checkpoint

    name = DEFAULT_NAMES[format]
    sources = [resolve_checkpoint(ref) for ref in members.refs]
    if output:  # before any work, as for one checkpoint
        path = output_file(output, name, inputs=sources, ours=lambda p: p.with_name(p.name + ".json").is_file())
    ensemble = restore_ensemble(members)
    shared_preprocessing(ensemble)
    if not output:
        folder = members.folder / "export" if members.folder else command_dir(None, "export")
        path = output_file(folder / name, name, ours=lambda p: p.with_name(p.name + ".json").is_file())
    temperatures = ensemble.temperatures()
    network = EnsembleNet([m.model.float().eval() for m in ensemble.members], ensemble.task, temperatures,
                          ensemble.weights).eval()
    metadata = {**export_metadata(ensemble.members[0]),
                "output_name": onnx_model.PROBABILITIES_NAME,
                "output": f"probabilities: {ensemble.describe()}"
                + ("; a label is predicted at multilabel_threshold" if ensemble.task == "multilabel" else ""),
                "calibration": None,  # the members' temperatures are inside the graph
                "backbone": [m.meta.get("backbone") for m in ensemble.members],
                "checkpoint": [str(m.checkpoint) for m in ensemble.members],
                "ensemble": {"source": members.source, "weights": ensemble.weights, "temperatures": temperatures}}
    return export_network(network, metadata, format, path, rtol, atol)


def export_restored(restored: Restored, format: str, path: Path, rtol: float = RTOL, atol: float = ATOL) -> ExportResult:
    """Write `restored`'s network (commands/restore.py) to `path` as onnx or torchscript, checked against PyTorch;
    `path` was already vetted (export does it before restoring)."""
    return export_network(restored.model.float().eval(), export_metadata(restored), format, path, rtol, atol)


def export_network(model: Any, metadata: dict, format: str, path: Path, rtol: float = RTOL,
                   atol: float = ATOL) -> ExportResult:
    """Write `model` (in eval mode, float32) with `metadata` to the vetted `path`, checked against PyTorch."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = dict(metadata)
    write, run = (export_onnx, onnx_model.run) if format == "onnx" else (export_torchscript, run_torchscript)
    # Written under a temporary name and checked there; only a file that passed takes the name (atomically), so
    # an earlier export stays whole until its replacement is known to be right.
    draft = path.with_name(f".{path.stem}{TEMP_SUFFIX}{path.suffix}")
    try:
        metadata["exporter"] = write(model, sample_inputs(metadata, 2, seed=0), draft, metadata)
        pairs = []
        for seed, batch in enumerate(CHECK_BATCHES, start=1):
            inputs = sample_inputs(metadata, batch, seed)
            with torch.inference_mode():
                expected = model(inputs).numpy()
            got, embedded = run(draft, inputs)
            pairs.append((expected, got))
            if embedded.get("class_names") != metadata["class_names"]:
                raise TransferError(f"{path} lost its metadata", "report this as a bug")
        agreement = compare(pairs, rtol, atol)
        agreement.require(f"the exported {format} model", "try the other format (format=torchscript / format=onnx), "
                          f"or accept a larger difference with e.g. rtol={10 * rtol:g}")
        os.replace(draft, path)
    finally:
        draft.unlink(missing_ok=True)
    sidecar = atomic_write_json(path.with_name(path.name + ".json"), metadata)
    return ExportResult(path, sidecar, format, agreement, metadata)


def export_command(args: list[str]) -> None:
    options, _ = parse_command_args("export", args, OPTIONS)
    result = export(options["ckpt"], options["format"], options["output"], options["rtol"], options["atol"],
                    options["license"])
    if result.format == "timm":
        print(f"wrote {result.path}: model.safetensors, config.json (label names, preprocessing), README.md; load it "
              f'with timm.create_model("local-dir:{result.path}", pretrained=True)')
        print(f"timm's load {result.agreement.line('the checkpoint')}")
        return
    print(f"wrote {result.path} ({result.format}, {result.metadata['exporter']}; preprocessing and "
          f"{len(result.metadata['class_names'])} class names inside and in {result.sidecar.name})")
    print(f"checked {result.agreement.line()}")


__all__ = ["export", "export_restored", "export_network", "export_command", "export_metadata", "ExportResult", "FORMATS", "OPTIONS"]
