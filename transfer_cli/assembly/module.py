"""The LightningModule of a run from the transfer, optimizer, scheduler, augmentation, eval and task settings."""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from transfer_cli.assembly.model import compile_mode
from transfer_cli.config.schema import TrainConfig
from transfer_cli.errors import TransferError
from transfer_cli.models.classifier import Classifier
from transfer_cli.precision import is_mixed
from transfer_cli.training.freezing import FreezePlan
from transfer_cli.training.losses import Criterion, build_criterion, class_weights, multilabel_conflicts
from transfer_cli.training.metrics import build_metrics
from transfer_cli.training.mixing import build_mixup
from transfer_cli.training.module import TransferModule
from transfer_cli.training.optim import build_optimizer
from transfer_cli.training.param_groups import param_groups
from transfer_cli.training.schedules import LRSchedule
from transfer_cli.training.tta import tta_for

log = logging.getLogger("transfer_cli")


def _mixing_on(cfg: TrainConfig) -> bool:
    aug = cfg.augmentation
    return float(aug.mix_prob) > 0 and (float(aug.mixup_alpha) > 0 or float(aug.cutmix_alpha) > 0)


def criterion_for(cfg: TrainConfig, num_classes: int, class_counts: Optional[Sequence[int]] = None) -> Criterion:
    """The loss of the run's task, with data.class_weights and augmentation.label_smoothing."""
    if cfg.task == "multilabel":
        unsupported = multilabel_conflicts(cfg.data.class_weights, cfg.augmentation.label_smoothing, _mixing_on(cfg))
        if unsupported:  # each is defined over one class per image here
            raise TransferError(
                f"task=multilabel does not support {', '.join(unsupported)} yet",
                "drop them: data.class_weights=none augmentation.label_smoothing=0 augmentation.mixup_alpha=0 "
                "augmentation.cutmix_alpha=0",
            )
        return build_criterion("multilabel")
    weight = class_weights(cfg.data.class_weights, class_counts, num_classes)
    return build_criterion("multiclass", weight, float(cfg.augmentation.label_smoothing))


def optimizer_factory(cfg: TrainConfig, plan: FreezePlan, device_type: str = "cpu"):
    """model -> the optimizer over its parameter groups (one per stage that ever trains, and the head), with the
    fastest kernels `device_type` and the trainer's clipping and precision allow."""
    opt = cfg.optimizer
    clip = bool(cfg.trainer.gradient_clip_val)
    mixed = is_mixed(cfg.trainer.precision)

    def make(model: Classifier) -> torch.optim.Optimizer:
        return build_optimizer(param_groups(model, plan, opt.lr, opt.weight_decay), opt, device_type, clip, mixed)

    return make


def transfer_module(cfg: TrainConfig, model: Classifier, block: dict, inputs: str = "images",
                    class_counts: Optional[Sequence[int]] = None, device_type: str = "cpu",
                    module_class: type[TransferModule] = TransferModule) -> TransferModule:
    """`block`: the plain data every checkpoint carries (assembly/model.py checkpoint_block); `device_type`: where
    the run trains; `module_class`: ProbeModule for a head solved before the fit (assembly/probe.py)."""
    num_classes = len(block["class_names"])
    plan = FreezePlan(cfg.transfer, model.stages)
    mixing = build_mixup(cfg.augmentation, num_classes)
    if mixing is not None and inputs != "images":
        log.warning("mixup/cutmix ignored: the head trains on cached backbone features, not on images "
                    "(to mix images: transfer.cache_features=false)")
        mixing = None
    tta = tta_for(cfg.eval.tta, cfg.eval.multicrop_fraction, one_call=compile_mode(cfg.trainer.compile) is not None)
    if tta is not None and inputs != "images":
        log.warning("eval.tta=%s ignored: the head is evaluated on cached backbone features, not on images "
                    "(for TTA: transfer.cache_features=false)", cfg.eval.tta)
        tta = None
    return module_class(
        model,
        criterion=criterion_for(cfg, num_classes, class_counts),
        metrics=build_metrics(cfg.task, num_classes, cfg.multilabel_threshold),
        optimizer=optimizer_factory(cfg, plan, device_type),
        schedule=LRSchedule(cfg.scheduler, cfg.callbacks.monitor, cfg.callbacks.mode),
        freeze=plan,
        tta=tta,
        mixing=mixing,
        inputs=inputs,
        channels_last=inputs == "images" and bool(cfg.trainer.channels_last),
        checkpoint_block=block,
    )


__all__ = ["transfer_module", "criterion_for", "optimizer_factory"]
