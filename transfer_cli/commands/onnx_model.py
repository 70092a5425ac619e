"""An ONNX file written by `transfer export format=onnx`, run by onnxruntime: for the export's own check and for
`transfer predict ckpt=<model.onnx | its folder>`.

Everything needed to feed it and read its output (preprocessing, class names, task, threshold) is in the file's
metadata_props and in the sidecar `<file>.json` beside it; the sidecar is read first since plain JSON needs no
onnxruntime, so a wrong argument fails before anything heavy loads. Nothing here imports torch at module level.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

from transfer_cli.errors import TransferError
from transfer_cli.run_files import RunLayout

log = logging.getLogger("transfer_cli")

INPUT_NAME, OUTPUT_NAME = "images", "logits"
PROBABILITIES_NAME = "probabilities"  # the output of an exported ensemble: its members' mean probabilities
METADATA_KEY = "transfer"  # the metadata_props entry holding the whole sidecar as JSON
DEFAULT_FILE = "model.onnx"
EXPORT_EXTRA = 'pip install "transfer-cli[export]"  (or: pip install onnx onnxscript onnxruntime)'
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def find_onnx(ref: str | Path) -> Optional[Path]:
    """The ONNX file `ref` names: an .onnx file, or a folder holding model.onnx (an export folder, not a run dir);
    None when `ref` is something else (a checkpoint or a run dir)."""
    path = Path(ref).expanduser()
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise TransferError(f"ckpt={ref}: no such ONNX file",
                                "transfer export ckpt=<run dir> format=onnx writes one (<run dir>/export/model.onnx)")
        return path.resolve()
    if path.is_dir() and (path / DEFAULT_FILE).is_file() and not RunLayout(path).checkpoints.is_dir():
        return (path / DEFAULT_FILE).resolve()
    return None


def require_onnxruntime(*more: str) -> None:
    missing = [m for m in ("onnxruntime", *more) if importlib.util.find_spec(m) is None]
    if missing:
        raise TransferError(f"ONNX needs {', '.join(missing)}, which is not installed", EXPORT_EXTRA)


def read_sidecar(path: Path) -> Optional[dict]:
    """The metadata beside `path` (what export wrote), or None when there is none."""
    sidecar = sidecar_of(path)
    if not sidecar.is_file():
        return None
    try:
        metadata = json.loads(sidecar.read_text())
    except ValueError as e:
        raise TransferError(f"{sidecar} is not valid JSON ({e})",
                            f"export again, or remove {sidecar.name} to use the metadata inside {path.name}")
    missing = [k for k in ("input_size", "mean", "std", "class_names") if k not in metadata]
    if missing:
        raise TransferError(f"{sidecar} lacks {', '.join(missing)}: it was not written by `transfer export`",
                            f"export again, or remove {sidecar.name} to use the metadata inside {path.name}")
    return metadata


def providers_for(accelerator: str) -> list[str]:
    """onnxruntime's execution providers for trainer.accelerator: CUDA first where onnxruntime has it (the
    onnxruntime-gpu wheel) and the accelerator allows a GPU, the CPU always as the fallback."""
    import onnxruntime

    wanted = str(accelerator or "auto")
    available = onnxruntime.get_available_providers()
    if wanted in ("gpu", "cuda", "auto") and CUDA in available:
        return [CUDA, CPU]
    if wanted in ("gpu", "cuda"):
        log.warning("trainer.accelerator=%s but this onnxruntime has no %s (pip install onnxruntime-gpu): running "
                    "on the CPU", wanted, CUDA)
    return [CPU]


def open_session(path: Path, providers: Optional[list[str]] = None) -> tuple[Any, dict]:
    """(an onnxruntime InferenceSession, the metadata inside the file)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=providers or [CPU])
    embedded = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    return session, json.loads(embedded) if embedded else {}


def load(path: Path, accelerator: str = "cpu") -> tuple[Any, dict]:
    """(session, metadata) of an exported model: the sidecar's metadata, else the file's own; the two must name the
    same classes, since a sidecar left from another export would label every prediction wrong."""
    sidecar = read_sidecar(path)
    session, embedded = open_session(path, providers_for(accelerator))
    metadata = sidecar or embedded
    if not metadata:
        raise TransferError(f"{path} carries no preprocessing or class names (no {sidecar_of(path).name}, no "
                            f"'{METADATA_KEY}' metadata): it was not written by `transfer export`",
                            "export the checkpoint: transfer export ckpt=<run dir> format=onnx")
    if sidecar and embedded and embedded.get("class_names") != sidecar.get("class_names"):
        raise TransferError(f"{sidecar_of(path).name} names other classes than {path.name} itself: it belongs to "
                            "another export", f"export again, or remove {sidecar_of(path).name}")
    inputs = [i.name for i in session.get_inputs()]
    if inputs != [INPUT_NAME]:
        raise TransferError(f"{path} takes inputs {inputs}, not ['{INPUT_NAME}']: it was not written by "
                            "`transfer export`", "export the checkpoint: transfer export ckpt=<run dir> format=onnx")
    return session, metadata


def forward_of(session: Any, output_name: str = OUTPUT_NAME) -> Callable[[Any], Any]:
    """The session as a function of a float32 NCHW torch tensor to its output (`output_name`: logits, or an
    ensemble's probabilities), for inference.infer."""
    import torch

    def forward(images: torch.Tensor) -> torch.Tensor:
        array = images.detach().float().cpu().contiguous().numpy()  # channels_last or not: ONNX takes NCHW
        return torch.from_numpy(session.run([output_name], {INPUT_NAME: array})[0])

    return forward


def run(path: Path, inputs: Any) -> tuple[Any, dict]:
    """(outputs, the file's metadata) from onnxruntime on the CPU: the export's check."""
    session, embedded = open_session(path)
    return session.run(None, {INPUT_NAME: inputs.numpy()})[0], embedded  # the one output, logits or probabilities


__all__ = ["find_onnx", "require_onnxruntime", "read_sidecar", "sidecar_of", "providers_for", "open_session", "load",
           "forward_of", "run", "INPUT_NAME", "OUTPUT_NAME", "PROBABILITIES_NAME", "EXPORT_EXTRA", "DEFAULT_FILE"]
