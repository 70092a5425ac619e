"""A trained network back from its checkpoint alone: config, class names, preprocessing and weights.

Everything eval, predict and export need is inside the checkpoint (TransferModule.on_save_checkpoint), so none
of the training arguments has to be repeated. The backbone is rebuilt without pretrained weights (no hub, no
weights file: the checkpoint's state_dict replaces them), and preprocessing is the checkpoint's data_config,
i.e. exactly what the network saw during validation.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from transfer_cli.config.resolve import resolve_run
from transfer_cli.config.keys import declared
from transfer_cli.config.overrides import override_key, parse
from transfer_cli.config.schema import TrainConfig
from transfer_cli.errors import TransferError
from transfer_cli.models.classifier import Classifier
from transfer_cli.resume.checkpoints import (
    checkpoint_config,
    checkpoint_meta,
    forget_checkpoint,
    read_checkpoint,
    resolve_checkpoint,
    run_dir_of,
)

log = logging.getLogger("transfer_cli")

MODEL_PREFIX = "model."  # TransferModule keeps the Classifier as `self.model`
# data.* keys that change the preprocessing (schema fields declared with role="preprocessing"); given on the
# command line they replace the checkpoint's values.
PREPROCESSING_KEYS = tuple(dotted.split(".", 1)[1] for dotted, _, spec in declared(TrainConfig)
                           if spec.role == "preprocessing")


@dataclass
class Restored:
    checkpoint: Path
    run_dir: Path
    cfg: TrainConfig  # the run's config with the command's overrides applied
    meta: dict
    data_config: dict  # input_size, interpolation, crop_pct, mean, std (+ member_norms for combined backbones)
    model: Classifier  # on the CPU, in eval mode

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def task(self) -> str:
        return str(self.meta.get("task") or self.cfg.task)

    @property
    def threshold(self) -> float:
        return float(self.cfg.multilabel_threshold)


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """`key=value` and `group=option` overrides (Hydra's grammar) on a config restored from a checkpoint."""
    from transfer_cli.config.folders import config_dir, config_groups
    from transfer_cli.config.schema import TrainConfig, structured_schema

    try:  # typed, so data.batch_size=abc fails here; a config from another version may not fit the schema
        cfg = OmegaConf.merge(structured_schema(), cfg)
    except Exception:
        cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    groups = config_groups()
    parsed = parse(list(overrides))
    for ov in sorted(parsed, key=lambda o: o.key_or_group not in groups):  # a group first, as Hydra does
        key = ov.key_or_group
        if ov.is_sweep_override():
            raise TransferError(f"{ov.input_line}: a sweep is not an override of one evaluation",
                                f"run the command once per value, e.g. {key}={next(ov.sweep_string_iterator())}")
        value = ov.value()
        try:
            if key in groups:  # data=imagefolder: that option's YAML over the schema defaults, as in training
                node = OmegaConf.load(config_dir() / key / f"{value}.yaml")
                base = structured_schema(type(getattr(TrainConfig(), key)))
                OmegaConf.update(cfg, key, OmegaConf.merge(base, node), merge=False)
            else:
                OmegaConf.update(cfg, key, value, merge=True, force_add=ov.input_line.startswith("+"))
        except TransferError:
            raise
        except Exception as e:  # omegaconf ValidationError / ConfigKeyError: they name the key and the type
            raise TransferError(f"{ov.input_line}: {str(e).splitlines()[0]}", f"check the value of {key}")
    return cfg


def _data_config(meta: dict, overrides: Sequence[str], cfg: TrainConfig) -> dict:
    data_config = dict(meta["data_config"])
    given = {override_key(o) for o in overrides}
    for key in PREPROCESSING_KEYS:
        if f"data.{key}" not in given or getattr(cfg.data, key) is None:
            continue
        if key == "image_size":  # timm's data config holds it as the input shape
            channels = int(data_config["input_size"][0])
            data_config["input_size"] = [channels, int(cfg.data.image_size), int(cfg.data.image_size)]
        else:
            value = getattr(cfg.data, key)
            data_config[key] = list(value) if isinstance(value, (list, tuple)) else value
    return data_config


def build_model(cfg: TrainConfig, meta: dict, state_dict: dict, source: Path) -> Classifier:
    """The Classifier of the run, its weights from `state_dict` (the checkpoint's)."""
    from transfer_cli.assembly.model import with_adapters
    from transfer_cli.models.combined import CombinedBackbone, build_backbone

    # No download and no weights file: every backbone tensor is in the checkpoint.
    model_cfg = dataclasses.replace(cfg.model, pretrained=False, weights=None)
    backbone, _ = build_backbone(model_cfg, cfg.data)
    adapted = with_adapters(backbone, cfg.transfer)  # the layers the checkpoint's adapter weights belong to
    # Per-member normalization of a feature combination is not in the state_dict; it came from each member's
    # weight source, which this rebuild skipped.
    norms = meta["data_config"].get("member_norms") if isinstance(backbone, CombinedBackbone) else None
    if norms:
        backbone.set_member_norms([(n["mean"], n["std"]) for n in norms])
    model = Classifier(backbone, len(meta["class_names"]), int(cfg.model.head_hidden_dim),
                       float(cfg.model.head_dropout))
    weights = {k[len(MODEL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(MODEL_PREFIX)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise TransferError(f"the weights in {source} do not fit the network its config describes: "
                            f"{str(e).splitlines()[0]}",
                            "pass a checkpoint written by this version of `transfer train`")
    if adapted:  # eval, predict and export see one plain timm network: W + B A in each layer's weight
        from transfer_cli.models.adapters import merge_adapters
        from transfer_cli.models.stages import backbone_stages

        merge_adapters(backbone)
        model.stages = backbone_stages(backbone)
    return model.eval()


def restore(ref: str | Path, overrides: Sequence[str] = (), prefer: str = "best") -> Restored:
    """The network and config of a run dir or .ckpt, with `overrides` (data.*, eval.*, ...) applied."""
    from transfer_cli.commands.members import is_ensemble, single

    ref = single(ref)
    if is_ensemble(ref) or str(ref).lstrip().startswith("["):  # eval, predict and export take several (commands/ensemble.py); the others take one
        raise TransferError(f"ckpt={ref} names several checkpoints (an ensemble); this command takes one",
                            "pass one member's run dir or .ckpt, or average same-start runs into one checkpoint: "
                            "transfer soup ckpt=[...]")
    path = resolve_checkpoint(ref, prefer=prefer)
    ckpt = read_checkpoint(path)
    meta = checkpoint_meta(ckpt, path)
    if "state_dict" not in ckpt:
        raise TransferError(f"{path} holds no state_dict", "pass a checkpoint written by `transfer train`")
    from transfer_cli.training.finite import check_weights

    check_weights(ckpt["state_dict"], str(path))  # a diverged run's weights predict nothing
    cfg = resolve_run(apply_overrides(checkpoint_config(ckpt), overrides))
    model = build_model(cfg, meta, ckpt["state_dict"], path)
    forget_checkpoint()  # the weights are in the model now
    log.info("restored %s (%s, %d classes)", path, meta.get("backbone"), len(meta["class_names"]))
    return Restored(path, run_dir_of(path), cfg, meta, _data_config(meta, overrides, cfg), model)


__all__ = ["Restored", "restore", "apply_overrides", "build_model"]
