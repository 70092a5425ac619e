"""How a run's head is fitted, from the transfer, model, augmentation, callbacks, data and task settings.

`transfer.head_solver`: whether a head on cached features is solved as a converged linear probe (lbfgs) or trained
by the epoch loop (sgd); `transfer.head_init=probe`: whether fine-tuning starts from that probe (LP-FT). Both are
one `ProbeFit` callback (training/probe_head.py), fed the features of the training and validation images.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, Optional

import torch
from torch.utils.data import TensorDataset

from transfer_cli.assembly.data import feature_pass
from transfer_cli.config.checks import lbfgs_blockers
from transfer_cli.config.schema import TrainConfig
from transfer_cli.data.datamodule import ImageDataModule
from transfer_cli.data.features import FeatureDataModule
from transfer_cli.data.splits import DataSplits
from transfer_cli.errors import TransferError
from transfer_cli.inference import autocast_for
from transfer_cli.models.classifier import Classifier
from transfer_cli.training.losses import class_weights
from transfer_cli.training.probe_head import ProbeFit

log = logging.getLogger("transfer_cli")


def _auto(blockers: list[str]) -> tuple[bool, str]:
    if blockers:
        return False, "sgd (the epoch loop): " + "; ".join(blockers)
    return True, "lbfgs: the linear head is solved to convergence, its L2 strength chosen on val (training/probe.py)"


def _lbfgs(blockers: list[str]) -> tuple[bool, str]:
    if blockers:
        raise TransferError("transfer.head_solver=lbfgs solves a linear head on cached features, but "
                            + "; ".join(blockers),
                            "use transfer.head_solver=sgd (or auto), or transfer=feature_extract augmentation=none "
                            "model.head_hidden_dim=0 model.head_dropout=0 augmentation.label_smoothing=0")
    return True, "lbfgs (transfer.head_solver=lbfgs): the linear head is solved to convergence"


# transfer.head_solver=<name>: (what keeps the probe from applying) -> (solve the head?, the log line's reason)
HEAD_SOLVERS: Dict[str, Callable[[list[str]], tuple[bool, str]]] = {
    "auto": _auto,
    "lbfgs": _lbfgs,
    "sgd": lambda blockers: (False, "sgd (transfer.head_solver=sgd): the epoch loop"),
}


def head_solver(cfg: TrainConfig, cached: bool) -> tuple[bool, str]:
    """(whether the head is solved rather than trained by steps, why)."""
    return HEAD_SOLVERS[cfg.transfer.head_solver](lbfgs_blockers(cfg, cached))


def solver_config(cfg: TrainConfig) -> TrainConfig:
    """The config the trainer of a solved head is built from: one pass, no optimizer-step settings. The run's own
    config (config.yaml, checkpoints) keeps what the user set; a resume derives the same pass from it."""
    t = cfg.trainer
    if t.max_epochs != 1:
        log.info("head solved: one pass over the data (trainer.max_epochs=%s applies to transfer.head_solver=sgd)",
                 t.max_epochs)
    trainer = dataclasses.replace(t, max_epochs=1, min_epochs=None, accumulate_grad_batches=1,
                                  gradient_clip_val=None, gradient_clip_algorithm=None, auto_batch_size=False,
                                  check_val_every_n_epoch=1, val_check_interval=None)
    return dataclasses.replace(cfg, trainer=trainer)


def probe_settings(cfg: TrainConfig, splits: DataSplits) -> dict:
    """The probe's arguments from the task and data settings: a run's probe and `transfer screen`'s are one."""
    n = len(splits.class_names)
    weights = class_weights(cfg.data.class_weights, splits.counts("train"), n) if cfg.task != "multilabel" else None
    return {"num_classes": n, "multilabel": cfg.task == "multilabel",
            "class_weights": None if weights is None else weights.tolist(), "seed": int(cfg.data.split_seed)}


def probe_fit(cfg: TrainConfig, splits: DataSplits, features: Callable[[], Dict[str, TensorDataset]],
              purpose: str) -> ProbeFit:
    """The callback fitting the probe on `features()`; `purpose`: solver | init (for its log line)."""
    return ProbeFit(features, **probe_settings(cfg, splits), resuming=bool(cfg.resume), purpose=purpose)


def init_features(cfg: TrainConfig, images: ImageDataModule, model: Classifier,
                  device: torch.device) -> Callable[[], Dict[str, TensorDataset]]:
    """The frozen pretrained backbone's features of the training and validation images through the eval
    transform (no augmentation, no views), from the feature store when an earlier run computed them."""
    pass_ = feature_pass(cfg, images, model, device, autocast_for(device, cfg.trainer.precision), views=0)
    return lambda: pass_.run(("train", "val")).tensors


def head_fit(cfg: TrainConfig, splits: DataSplits, images: ImageDataModule, datamodule: object, model: Classifier,
             device: torch.device, solve: bool) -> Optional[ProbeFit]:
    """The ProbeFit callback of a run, if its head is solved or starts from the probe; else None."""
    if solve:
        if cfg.transfer.head_init == "probe":
            log.info("transfer.head_init=probe: the solved head is the probe already")
        return probe_fit(cfg, splits, lambda: datamodule.features.tensors, "solver")  # type: ignore[attr-defined]
    if cfg.transfer.head_init == "probe":
        log.info("head starts from the linear probe on the frozen backbone's features (transfer.head_init=probe)")
        if isinstance(datamodule, FeatureDataModule) and not datamodule.views:  # the eval-mode features at hand
            return probe_fit(cfg, splits, lambda: datamodule.features.tensors, "init")  # type: ignore[union-attr]
        return probe_fit(cfg, splits, init_features(cfg, images, model, device), "init")
    return None


__all__ = ["HEAD_SOLVERS", "head_solver", "solver_config", "probe_settings", "probe_fit", "init_features",
           "head_fit"]
