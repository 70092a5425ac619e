"""The backbone factory: a timm feature extractor (num_classes=0), weights from the hub, a file or a named source."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
import os
import pickle
import socket
import threading
import urllib.error
import urllib.parse
from typing import Any, Dict, Iterator, List, Optional, Union

import timm
import timm.data
import torch
from timm.models import is_model_pretrained, list_pretrained, parse_model_name

from transfer_cli.errors import TransferError
from transfer_cli.models.named_weights import NAMED_WEIGHTS, NamedWeights

logger = logging.getLogger("transfer_cli")

_HUB_TIMEOUT_S = 2.0
# Globals that a checkpoint may need besides tensors: Lightning pickles `hyper_parameters` (often OmegaConf
# containers) into .ckpt files. These only rebuild plain data, unlike e.g. builtins.eval, so they are allowed.
_SAFE_GLOBAL_NAMES = {f"builtins.{t}" for t in ("int", "float", "str", "bool", "bytes", "dict", "list", "tuple", "set")}
_SAFE_GLOBAL_NAMES |= {"collections.defaultdict", "collections.OrderedDict", "typing.Any", "pathlib.PosixPath"}


def _close_matches(name: str, candidates: List[str], n: int = 5) -> List[str]:
    return difflib.get_close_matches(name.lower(), candidates, n=n, cutoff=0.5)


def _validate_name(name: str) -> Optional[str]:
    """Fail early, with suggestions, on a name timm would not build. Returns the source prefix (hf-hub, ...) or None."""
    try:
        source, model_id = parse_model_name(name)
    except ValueError as e:
        raise TransferError(str(e), "model.backbone=<a timm model name, or hf-hub:<org>/<repo>>") from e
    if source is not None:
        return source  # hub repos and local folders are only known once fetched
    arch, _, tag = model_id.partition(".")
    if timm.is_model(arch) and (not tag or is_model_pretrained(model_id)):
        return None
    if timm.is_model(arch):  # a real architecture with a pretrained tag timm doesn't have
        tags = list_pretrained(f"{arch}.*")
        matches = _close_matches(model_id, tags) or tags[:5]
        what = f"timm has no pretrained tag '{tag}' for {arch}"
    else:
        matches = _close_matches(model_id, sorted(set(timm.list_models()) | set(timm.list_models(pretrained=True))))
        what = f"unknown backbone '{name}'"
    hint = f"; close matches: {', '.join(matches)}" if matches else ""
    fix = f"model.backbone={matches[0]}" if matches else "model.backbone=<name from timm.list_models()>"
    raise TransferError(what + hint, fix)


def hub_reachable(timeout: float = _HUB_TIMEOUT_S) -> bool:
    """Quick TCP connect to the hub endpoint. The hub client itself retries for ~45 s before giving up offline."""
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    address = (url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443))
    result: List[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # A thread, because the DNS lookup inside create_connection ignores `timeout` and can hang on a bad resolver.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


@contextlib.contextmanager
def _hub_offline_if_unreachable() -> Iterator[bool]:
    """Yields True when the hub was switched to offline mode (only cached files are used, with no retries).

    huggingface_hub reads HF_HUB_OFFLINE into `constants.HF_HUB_OFFLINE` at import, and every request checks that
    attribute, so setting the environment variable now would be ignored; the attribute is set and restored instead.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or hub_reachable():
        yield bool(constants.HF_HUB_OFFLINE)
        return
    logger.info("%s is unreachable; using the local Hugging Face cache only", constants.ENDPOINT)
    previous, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = previous


def _timm_kwargs(model_cfg: Any) -> Dict[str, Any]:
    kwargs = dict(model_cfg.timm_kwargs or {})
    for key in ("num_classes", "pretrained"):
        if key in kwargs:
            raise TransferError(f"model.timm_kwargs.{key} is set by transfer itself", f"~model.timm_kwargs.{key}")
    for key in ("drop_rate", "drop_path_rate"):  # model.drop_rate / model.drop_path_rate, when set
        if getattr(model_cfg, key, None) is not None:
            kwargs[key] = float(getattr(model_cfg, key))
    return kwargs


def create_backbone(model_cfg: Any) -> torch.nn.Module:
    """A timm model returning pooled features (`.num_features` wide), with the weights `model_cfg` (the model
    group's record) asks for."""
    name = model_cfg.backbone
    source = _validate_name(name)
    kwargs = _timm_kwargs(model_cfg)
    named = NAMED_WEIGHTS.get(model_cfg.weights) if model_cfg.weights else None
    if named is not None and timm.models.get_arch_name(name) != named.architecture:
        raise TransferError(
            f"model.weights={named.name} are weights for {named.architecture}, not {name}",
            f"model.backbone={named.architecture}  (or model.weights=null)",
        )
    if model_cfg.weights and named is None:
        _weights_path(model_cfg.weights)  # a missing file should fail before a model is built
    pretrained = bool(model_cfg.pretrained) and not model_cfg.weights  # explicit weights win over the hub
    if pretrained and source is None and not is_model_pretrained(name):
        # timm would only warn and return random weights, which defeats transfer learning.
        raise TransferError(
            f"timm has no pretrained weights for {name}",
            "model.pretrained=false, or model.weights=<path to a state dict>, or a backbone from "
            "timm.list_models(pretrained=True)",
        )
    if not (source == "hf-hub" or (pretrained and source is None)):  # no network needed
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    else:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

        hub_errors = (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, urllib.error.URLError)
        with _hub_offline_if_unreachable() as offline:
            try:
                model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
            except hub_errors as e:
                why = "the Hugging Face hub is unreachable and they are not in the local cache" if offline else str(e)
                what = "the config and weights" if source == "hf-hub" else "the pretrained weights"
                fix = "model.weights=<path to a state dict>  (or model.pretrained=false to start from random weights)"
                if source == "hf-hub":  # even pretrained=false needs the hub for the model's config
                    fix = "model.backbone=<timm architecture name> with " + fix
                raise TransferError(f"could not get {what} of {name}: {why}", fix) from e
    if model_cfg.weights:
        load_weights(model, model_cfg.weights)
    return model


def _torch_load(path: str) -> Any:
    fix = "model.weights=<a file written by torch.save(model.state_dict(), ...) or safetensors>"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (KeyError, EOFError, RuntimeError) as e:  # how torch.load reports a truncated or non-torch file
        raise TransferError(f"{path} is not a readable PyTorch checkpoint: {e!r}", fix) from e
    except pickle.UnpicklingError as e:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except ValueError:  # only zip-format files can be inspected
            raise TransferError(f"{path} is not a readable PyTorch checkpoint holding only tensors", fix) from e
        refused = [n for n in unsafe if n not in _SAFE_GLOBAL_NAMES and not n.startswith("omegaconf.")]
        if refused:
            raise TransferError(
                f"{path} holds pickled Python objects beyond tensors ({', '.join(refused)}), "
                "which are not loaded since they could run code",
                "if you trust the file, re-save its state dict: torch.save(torch.load(p, weights_only=False)"
                "['state_dict'], 'weights.pth'), then model.weights=weights.pth",
            ) from e
    allowed = []
    for full_name in unsafe:
        module, _, attr = full_name.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), attr))
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def _weights_path(weights: str) -> str:
    path = os.path.expanduser(weights)
    if not os.path.isfile(path):
        raise TransferError(
            f"model.weights={weights}: no such file, and not a named source ({', '.join(sorted(NAMED_WEIGHTS))})",
            "model.weights=<existing .pth/.pt/.bin/.safetensors/.ckpt file or a named source>",
        )
    return path


def read_state_dict(weights: str) -> Dict[str, torch.Tensor]:
    """A named source's or a file's state dict, unwrapped to the backbone's own key names."""
    if weights in NAMED_WEIGHTS:
        return NAMED_WEIGHTS[weights].load()
    path = _weights_path(weights)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(path, device="cpu")
        except SafetensorError as e:
            raise TransferError(f"{path} is not a readable safetensors file: {e}", "re-export the weights") from e
    else:
        obj = _torch_load(path)
    # Unwrap the usual containers: Lightning / training-script checkpoints and DataParallel's `module.` prefix.
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise TransferError(f"{path} holds a {type(obj).__name__}, not a state dict", "save model.state_dict()")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    for prefix in ("model.backbone.", "module."):
        if any(k.startswith(prefix) for k in state):
            # Our own .ckpt also holds the head (model.head.*), which belongs to another task: keep the backbone.
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_weights(model: torch.nn.Module, weights: str) -> None:
    """Load `weights` (named source or file) into a timm feature extractor, dropping the source's classifier."""
    state = read_state_dict(weights)
    classifiers = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    dropped = [k for k in state if any(k == c or k.startswith(c + ".") for c in classifiers)]
    for k in dropped:
        del state[k]
    own = model.state_dict()
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    matched = [k for k in state if k in own and state[k].shape == own[k].shape]
    arch = model.pretrained_cfg.get("architecture", type(model).__name__)
    if mismatched or not matched:
        detail = (
            f"{len(mismatched)} tensors have other shapes, e.g. {mismatched[0]}: {tuple(state[mismatched[0]].shape)} "
            f"vs {tuple(own[mismatched[0]].shape)}"
            if mismatched
            else f"none of its {len(state)} tensor names exist in the model (e.g. {next(iter(state), '-')})"
        )
        raise TransferError(
            f"model.weights={weights} do not fit backbone {arch}: {detail}",
            "model.backbone=<the architecture the weights were saved from>, or model.weights=null",
        )
    result = model.load_state_dict({k: state[k] for k in matched}, strict=False)
    unexpected = [k for k in state if k not in own]
    logger.info("loaded %d/%d tensors from %s (dropped classifier: %s)", len(matched), len(own), weights, dropped)
    if result.missing_keys:
        logger.warning("weights %s: %d missing keys kept at random init: %s", weights, len(result.missing_keys),
                       result.missing_keys)
    if unexpected:
        logger.warning("weights %s: %d unexpected keys ignored: %s", weights, len(unexpected), unexpected)


def resolve_data_config(
    backbone: torch.nn.Module, data_cfg: Any = None, named_source: Union[NamedWeights, str, None] = None
) -> Dict[str, Any]:
    """Preprocessing: timm's config for `backbone` < the named weight source's < explicit `data_cfg` values
    (the data group's record: image_size, crop_pct, interpolation, mean, std).

    `named_source` may be a NamedWeights, its name, or any `model.weights` value (a file path is ignored).
    """
    timm_cfg = timm.data.resolve_data_config(model=backbone)
    cfg: Dict[str, Any] = {k: timm_cfg[k] for k in ("input_size", "interpolation", "crop_pct", "mean", "std")}
    if isinstance(named_source, str):
        named_source = NAMED_WEIGHTS.get(named_source)
    if named_source is not None:
        cfg.update(named_source.data_config)
    channels = cfg["input_size"][0]
    if data_cfg is not None:
        if data_cfg.image_size is not None:
            cfg["input_size"] = (channels, int(data_cfg.image_size), int(data_cfg.image_size))
        for key in ("crop_pct", "interpolation", "mean", "std"):
            if getattr(data_cfg, key) is not None:
                cfg[key] = getattr(data_cfg, key)
    cfg["mean"], cfg["std"] = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    for key in ("mean", "std"):
        if len(cfg[key]) != channels:
            raise TransferError(f"data.{key} has {len(cfg[key])} values for {channels}-channel input",
                                f"data.{key}=[{', '.join(['0.5'] * channels)}]  (one value per channel)")
    cfg["crop_pct"], cfg["interpolation"] = float(cfg["crop_pct"]), str(cfg["interpolation"])
    return cfg


__all__ = ["create_backbone", "load_weights", "read_state_dict", "resolve_data_config"]
