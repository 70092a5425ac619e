"""The network of a run from the model group (and the data group's preprocessing keys), and its metadata."""

from __future__ import annotations

from typing import Any, Optional

import torch

from transfer_cli.config.modes import transfer_mode
from transfer_cli.config.schema import TrainConfig, TransferConfig
from transfer_cli.data.splits import DataSplits
from transfer_cli.models.classifier import Classifier
from transfer_cli.models.combined import build_backbone
from transfer_cli.resume.fingerprint import FINGERPRINT_KEY, fingerprint

# trainer.compile=<name>: torch.compile's mode for the network, None for eager. true is torch's default mode;
# reduce-overhead adds CUDA graphs (one replay per step instead of a launch per kernel: small batches on a
# large GPU), max-autotune also searches kernels (longest compile).
COMPILE_MODES: dict[str, Optional[str]] = {"false": None, "true": "default", "default": "default",
                                           "reduce-overhead": "reduce-overhead", "max-autotune": "max-autotune"}


def compile_mode(value: Any) -> Optional[str]:
    """trainer.compile as torch.compile's mode, or None: false/true as booleans too (configs of older runs)."""
    return COMPILE_MODES[str(value).lower() if value is not None else "false"]


def plain(value: Any) -> Any:
    """Tuples to lists, so metadata is plain JSON/YAML-able data inside checkpoints."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def build_model(cfg: TrainConfig, num_classes: int) -> tuple[Classifier, dict]:
    """(the Classifier, the preprocessing its backbone expects: timm's data config with data.* overrides)."""
    backbone, data_config = build_backbone(cfg.model, cfg.data)
    with_adapters(backbone, cfg.transfer)
    model = Classifier(backbone, num_classes, cfg.model.head_hidden_dim, cfg.model.head_dropout)
    return model, data_config


def with_adapters(backbone: torch.nn.Module, transfer: TransferConfig) -> list[str]:
    """The transfer mode's adapters added to `backbone` (before its stages are read, so they join them); the
    names of the layers that got one. A training run and a restored checkpoint build the same layers."""
    if not transfer_mode(transfer.mode).adapters:
        return []
    from transfer_cli.models.adapters import adapter_targets, add_adapters
    from transfer_cli.models.stages import backbone_stages

    targets = adapter_targets(backbone, backbone_stages(backbone), transfer.lora_targets,
                              int(transfer.freeze_stages or 0))
    add_adapters(backbone, targets, transfer.lora_rank, transfer.lora_alpha, transfer.lora_dropout)
    return targets


def prepare_for_training(model: Classifier, cfg: TrainConfig, images: bool) -> None:
    """Speed only, for image batches (a head on features has no convolutions): channels_last is the layout
    cuDNN and oneDNN convolutions run fastest in; nn.Module.compile keeps the state-dict keys unchanged."""
    if not images:
        return
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    mode = compile_mode(cfg.trainer.compile)
    if mode is not None:
        model.compile(mode=mode)


def run_meta(cfg: TrainConfig, splits: DataSplits, data_config: dict, model: Classifier) -> dict:
    """What a checkpoint says about its network besides the weights: classes, preprocessing, task."""
    return {
        "class_names": list(splits.class_names),
        "class_to_idx": {name: i for i, name in enumerate(splits.class_names)},
        "data_config": plain(dict(data_config)),
        "backbone": list(cfg.model.backbones) or cfg.model.backbone,
        "num_features": model.num_features,
        "task": cfg.task,  # multilabel: sigmoid outputs, decoded to label sets at multilabel_threshold
        "multilabel_threshold": float(cfg.multilabel_threshold),
    }


def checkpoint_block(config: dict, meta: dict) -> dict:
    """The plain-data block of every checkpoint: the resolved config, the metadata and the fingerprint a resume
    checks the data and model against."""
    return {"config": config, **meta, FINGERPRINT_KEY: fingerprint(meta)}


__all__ = ["build_model", "with_adapters", "prepare_for_training", "run_meta", "checkpoint_block", "plain", "COMPILE_MODES",
           "compile_mode"]
