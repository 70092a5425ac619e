"""`transfer export format=timm` and `transfer push`: a trained checkpoint as a timm model others load by name.

The folder holds what timm's own `save_for_hf` writes (model.safetensors, config.json with the architecture, the
label names and the preprocessing as `pretrained_cfg`) and a README.md model card, so that
`timm.create_model("local-dir:<folder>", pretrained=True)` (or "hf-hub:<user>/<name>" once pushed) is the trained
network, head included. Our Classifier is a timm backbone (num_classes=0) plus a new head; a linear head maps onto
the timm model's own classifier, so the folder needs nothing of this tool. A head with a hidden layer and feature
combinations have no timm equivalent and are refused with the formats that do keep them. The folder is checked
before it is kept: timm loads it and must give the checkpoint's logits.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from transfer_cli.atomic import atomic_write_text
from transfer_cli.commands.check_inputs import (
    ATOL,
    CHECK_BATCHES,
    RTOL,
    Agreement,
    compare,
    sample_inputs,
)
from transfer_cli.config.args import Option, parse_command_args
from transfer_cli.errors import TransferError
from transfer_cli.commands.evaluate import REPORT_NAME
from transfer_cli.run_files import RunLayout

if TYPE_CHECKING:  # the name only: restore.py brings OmegaConf and the model code, loaded when a command runs
    from transfer_cli.commands.restore import Restored

log = logging.getLogger("transfer_cli")

TIMM_DIR = "timm"  # <run dir>/export/timm by default
FOLDER_FILES = ("config.json", "model.safetensors", "README.md")
DATA_LICENSES = {"elpv": "cc-by-nc-sa-4.0"}  # the elpv-dataset package's licence (data/elpv.py)
OTHER_FORMATS = "export format=onnx or format=torchscript, which keep any network"


def _linear_head(restored: Restored) -> Any:
    from torch import nn

    cfg = restored.cfg
    if cfg.model.backbones or cfg.model.feature_stages:
        raise TransferError("format=timm cannot hold a feature combination (model.backbones / model.feature_stages): "
                            "timm has no model that concatenates several backbones or feature levels", OTHER_FORMATS)
    linears = [m for m in restored.model.head.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise TransferError(f"format=timm maps a linear head onto the timm model's classifier; this checkpoint's head "
                            f"has a hidden layer (model.head_hidden_dim={cfg.model.head_hidden_dim})", OTHER_FORMATS)
    return linears[0]


def timm_model(restored: Restored) -> Any:
    """The timm model (num_classes = the checkpoint's classes) holding the checkpoint's backbone and head."""
    import timm

    head = _linear_head(restored)
    cfg = restored.cfg
    model = timm.create_model(cfg.model.backbone, pretrained=False, num_classes=len(restored.class_names),
                              **dict(cfg.model.timm_kwargs or {}))
    classifier = model.pretrained_cfg.get("classifier") or "classifier"
    state = dict(restored.model.backbone.state_dict())
    state[f"{classifier}.weight"], state[f"{classifier}.bias"] = head.weight, head.bias
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise TransferError(f"the checkpoint's weights do not fit timm's {cfg.model.backbone} with a "
                            f"{len(restored.class_names)}-class classifier (missing {result.missing_keys[:5]}, "
                            f"unexpected {result.unexpected_keys[:5]})", OTHER_FORMATS)
    return model.eval()


def _run_files(run_dir: Path) -> tuple[dict, dict, list[str]]:
    """(summary.json, eval/eval_report.json, the training command's overrides) of the run, where present."""
    def load(path: Path) -> dict:
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            return {}

    overrides: list[str] = []
    path = run_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        import yaml

        overrides = [str(o) for o in yaml.safe_load(path.read_text()) or []]
    return load(RunLayout(run_dir).summary), load(run_dir / "eval" / REPORT_NAME), overrides


def model_card(restored: Restored, name: str, licence: str, load_as: str) -> str:
    """README.md: what the model tells apart, from which data, trained how, scoring what."""
    cfg, names, dc = restored.cfg, restored.class_names, restored.data_config
    summary, evaluation, overrides = _run_files(restored.run_dir)
    data = evaluation.get("data") or f"data.source={cfg.data.source}" + (
        f", {cfg.data.root or cfg.data.csv}" if (cfg.data.root or cfg.data.csv) else "")
    task = ("multi-label: one sigmoid per label, a label is predicted at probability >= "
            f"{restored.threshold}" if restored.task == "multilabel" else "multiclass: softmax over the classes")
    weights = cfg.model.weights or ("timm's pretrained weights" if cfg.model.pretrained else "random initialization")
    sizes = ", ".join(f"{k} {summary[f'{k}_size']}" for k in ("train", "val", "test") if summary.get(f"{k}_size"))
    results = [f"| {key} | {summary[key]:.4f} |" for key in ("test_acc", "val_acc", "test_mAP", "val_mAP")
               if isinstance(summary.get(key), float)]
    if evaluation.get("metrics"):
        results += [f"| {key} ({evaluation.get('split')}, `transfer eval`) | {value:.4f} |"
                    for key, value in evaluation["metrics"].items()]
    command = "transfer train " + " ".join(shlex.quote(o) for o in overrides) if overrides else None
    lines = [
        "---", "library_name: timm", f"license: {licence}", "pipeline_tag: image-classification",
        "tags:", "- image-classification", "- timm", "- transfer-cli", "---", "",
        f"# {name}", "",
        f"A `{cfg.model.backbone}` image classifier trained with `transfer` (transfer-cli, "
        f"`transfer.mode={cfg.transfer.mode}`), exported in timm's format.", "",
        "## Task", "", f"{task}; {len(names)} classes, in output order:", "",
        *[f"{i}. {n}" for i, n in enumerate(names)], "",
        "## Use", "", "```python", "import timm, torch", "from PIL import Image", "",
        f'model = timm.create_model("{load_as}", pretrained=True).eval()',
        "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))",
        'labels = model.pretrained_cfg["label_names"]',
        "with torch.no_grad():",
        '    logits = model(transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0))',
        "print(labels[int(logits.argmax())])" if restored.task != "multilabel" else
        "print([l for l, p in zip(labels, logits.sigmoid()[0]) if p >= 0.5])", "```", "",
        "## Data", "", f"- {data}", f"- licence of the data: {licence}" + (
            "" if cfg.data.source in DATA_LICENSES else " (as given to the export; check the data's own terms)"),
        *([f"- images: {sizes}"] if sizes else []), "",
        "## Training recipe", "",
        f"- backbone `{cfg.model.backbone}` from {weights}; transfer mode `{cfg.transfer.mode}`"
        + (f", first {cfg.transfer.freeze_stages} stages frozen" if cfg.transfer.freeze_stages else ""),
        f"- {cfg.optimizer.name} at lr {cfg.optimizer.lr:g} (weight decay {cfg.optimizer.weight_decay:g}), "
        f"{cfg.scheduler.name} schedule, {summary.get('epochs', cfg.trainer.max_epochs)} epochs, batch "
        f"{summary.get('batch_size', cfg.data.batch_size)}, precision {cfg.trainer.precision}, seed {cfg.seed}",
        f"- augmentation `{cfg.augmentation.name}`; label smoothing {cfg.augmentation.label_smoothing:g}; "
        f"test-time augmentation `{cfg.eval.tta}` (not part of this model)",
        *([f"- command: `{command}`"] if command else []), "",
        "## Preprocessing", "",
        f"input {tuple(dc['input_size'])}, {dc.get('interpolation')} resize to input / crop_pct "
        f"({float(dc.get('crop_pct') or 1.0):g}), centre crop, mean {list(dc['mean'])}, std {list(dc['std'])} "
        "(in config.json's `pretrained_cfg`).", "",
        "## Results", "", *(["| metric | value |", "|---|---|", *results] if results else
                            ["No test or validation score was recorded with this run."]), "",
    ]
    return "\n".join(lines)


def _save(model: Any, folder: Path, names: list[str], data_config: dict, model_args: dict) -> None:
    from timm.models import save_for_hf

    preprocessing = {"input_size": tuple(int(v) for v in data_config["input_size"]),
                     "interpolation": str(data_config.get("interpolation", "bilinear")),
                     "crop_pct": float(data_config.get("crop_pct") or 1.0), "crop_mode": "center",
                     "mean": tuple(float(v) for v in data_config["mean"]),
                     "std": tuple(float(v) for v in data_config["std"])}
    kwargs: dict[str, Any] = {"model_config": {"label_names": list(names), "pretrained_cfg": dict(preprocessing)},
                              "model_args": model_args or None, "safe_serialization": True}
    if "data_config" in inspect.signature(save_for_hf).parameters:  # newer timm: also drops test-time sizes
        kwargs["data_config"] = preprocessing
    save_for_hf(model, str(folder), **kwargs)


def _check(folder: Path, reference: Any, names: list[str], data_config: dict, rtol: float, atol: float) -> Agreement:
    """Load the folder as a user would and compare its logits with the checkpoint's network."""
    import timm
    import torch

    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    if list(loaded.pretrained_cfg.get("label_names") or []) != list(names):
        raise TransferError(f"{folder} lost its label names", "report this as a bug")
    pairs = []
    meta = {"input_size": data_config["input_size"], "mean": data_config["mean"], "std": data_config["std"]}
    for seed, batch in enumerate(CHECK_BATCHES, start=1):
        inputs = sample_inputs(meta, batch, seed)
        with torch.inference_mode():
            pairs.append((reference(inputs).numpy(), loaded(inputs).numpy()))
    agreement = compare(pairs, rtol, atol)
    agreement.require("timm's load of the exported folder", OTHER_FORMATS)
    return agreement


def _place(built: Path, output: Path) -> None:
    """The new folder under `output`'s name: a previous export is replaced, anything else is never touched."""
    if output.exists():
        extra = sorted(p.name for p in output.iterdir()) if output.is_dir() else [output.name]
        if not output.is_dir() or set(extra) - set(FOLDER_FILES):
            raise TransferError(f"{output} exists and holds other files than an export ({', '.join(extra[:5])})",
                                "choose another folder: output=<new folder>")
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, old / output.name)
        os.replace(built, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(built, output)


def export_timm(restored: Restored, output: Optional[Path] = None, licence: Optional[str] = None,
                repo: Optional[str] = None, rtol: float = RTOL, atol: float = ATOL) -> tuple[Path, Agreement]:
    """The timm folder of the checkpoint `restored` (commands/restore.py); (its path, its logits' agreement with
    the checkpoint's)."""
    model = timm_model(restored)
    output = (output or restored.run_dir / "export" / TIMM_DIR).expanduser().resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    licence = licence or DATA_LICENSES.get(restored.cfg.data.source, "unknown")
    built = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        _save(model, built, restored.class_names, restored.data_config, dict(restored.cfg.model.timm_kwargs or {}))
        name = repo or f"{restored.cfg.name}-{restored.cfg.model.backbone}"
        load_as = f"hf-hub:{repo}" if repo else f"local-dir:{output}"
        atomic_write_text(built / "README.md", model_card(restored, name, licence, load_as))
        agreement = _check(built, restored.model.float().eval(), restored.class_names, restored.data_config, rtol,
                           atol)
        _place(built, output)
    finally:
        shutil.rmtree(built, ignore_errors=True)  # gone already when placed
    return output, agreement


def push(folder: Path, repo: str, private: bool = False) -> str:
    """Upload the folder to the Hugging Face Hub; the repo's URL. Offline or without a token: a clear error."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from transfer_cli.models.backbone import (
        hub_reachable,  # the quick TCP probe weights downloads use too
    )

    later = f"when online: transfer push again, or upload the folder yourself: hf upload {repo} {folder}"
    if constants.HF_HUB_OFFLINE:
        raise TransferError(f"cannot push to {constants.ENDPOINT}: HF_HUB_OFFLINE is set; the model is exported to "
                            f"{folder}", f"unset HF_HUB_OFFLINE, then push; or {later}")
    if not hub_reachable():
        raise TransferError(f"cannot reach {constants.ENDPOINT} (offline?); the model is exported to {folder}", later)
    if get_token() is None:
        raise TransferError("no Hugging Face token: pushing needs an account with write access",
                            f"hf auth login (or set HF_TOKEN), then push again; the folder is {folder}")
    api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="Upload model exported by transfer")
    except HfHubHTTPError as e:
        raise TransferError(f"the Hugging Face Hub refused the push to {repo}: {str(e).splitlines()[0]}",
                            f"check the repo name and your token's write access; the folder is {folder}") from e
    except OSError as e:  # the connection dropped after the probe
        raise TransferError(f"the push to {repo} failed: {type(e).__name__}: {e}", later) from e
    return str(url)


PUSH_OPTIONS = {
    "ckpt": Option(str, required=True, help="a run dir or a .ckpt file", example="outputs/<name>/<date>_<time>"),
    "repo": Option(str, required=True, help="the Hub repo, <user or org>/<name>", example="<user>/<name>"),
    "private": Option(lambda t: {"true": True, "false": False}[t.lower()], False, help="true or false"),
    "license": Option(str, None, help="the model card's licence (default: the data's, if known, else unknown)"),
    "output": Option(str, None, help="the folder exported first (default: <run dir>/export/timm)"),
}


def push_command(args: list[str]) -> None:
    from transfer_cli.commands.restore import restore

    options, _ = parse_command_args("push", args, PUSH_OPTIONS)
    repo = options["repo"]
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise TransferError(f"repo={repo} is not <user or org>/<name>", "e.g. repo=alice/elpv-efficientnet")
    output = Path(options["output"]) if options["output"] else None
    folder, agreement = export_timm(restore(options["ckpt"]), output, options["license"], repo=repo)
    print(f"exported {folder}; timm's load {agreement.line('the checkpoint')}")
    print(f"pushed: {push(folder, repo, options['private'])}")


__all__ = ["export_timm", "timm_model", "model_card", "push", "push_command", "TIMM_DIR", "DATA_LICENSES",
           "PUSH_OPTIONS"]
