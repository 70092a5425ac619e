"""A run's head fitted as the converged linear probe (training/probe.py) before its fit starts.

Two uses, one callback (`ProbeFit`):
- `transfer.head_solver=lbfgs`: the head of a frozen backbone on cached features is solved, not stepped. The fit
  is then one pass of `ProbeModule`, which measures the solved head on the training features (no optimizer) and
  validates it, so checkpoints, metrics, the test and resume are those of any run.
- `transfer.head_init=probe` (LP-FT, Kumar et al., ICLR 2022): fine-tuning starts from the probe fitted on the
  frozen, eval-mode backbone's features of the training images instead of a random head, whose large early
  gradients would otherwise distort the pretrained features.

The probe is fitted in the callback's `setup`, after the datamodule's (which computes cached features) and before
the optimizer exists or a checkpoint is restored; a resumed run skips it, since its checkpoint holds the head.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.core.optimizer import LightningOptimizer
from torch import nn
from torch.utils.data import TensorDataset

from transfer_cli.data.splits import multilabel_split, stratified_split
from transfer_cli.errors import TransferError
from transfer_cli.training.module import TransferModule
from transfer_cli.training.probe import ProbeResult, fit_probe

log = logging.getLogger("transfer_cli")

HOLDOUT = 0.2  # without a validation split: the share of the training rows that chooses the strength


def fit_probe_on_train(train_x: torch.Tensor, train_y: torch.Tensor, *, num_classes: int, multilabel: bool = False,
                       holdout: float = HOLDOUT, seed: int = 0, **kwargs: Any) -> ProbeResult:
    """The probe of a run without a validation split: its strength chosen on a seeded, stratified `holdout` of the
    training rows, then refitted on all of them at the strength scaled by rows fitted / all rows, which keeps the
    penalty per sample where it was chosen (scikit-learn's LogisticRegressionCV refit keeps C, the same thing).
    `kwargs`: fit_probe's other options."""
    if multilabel:
        label_sets = [tuple(torch.nonzero(row >= 0.5).flatten().tolist()) for row in train_y]
        fit_list, held_list = multilabel_split(label_sets, [1 - holdout, holdout], seed)
    else:
        fit_list, held_list = stratified_split(train_y.tolist(), [1 - holdout, holdout], seed)
    if not fit_list or not held_list:
        raise ValueError(f"{len(train_y)} training rows are too few to hold out {holdout:.0%} to choose a strength")
    fit_rows, held = torch.as_tensor(fit_list), torch.as_tensor(held_list)
    common = dict(num_classes=num_classes, multilabel=multilabel, **kwargs)
    chooser = fit_probe(train_x[fit_rows], train_y[fit_rows], train_x[held], train_y[held], **common)
    common.pop("strengths", None)
    final = fit_probe(train_x, train_y, train_x[held], train_y[held], strengths=[
        chooser.strength * len(fit_rows) / len(train_y)], patience=None, **common)
    return dataclasses.replace(chooser, linear=final.linear, fit_seconds=chooser.fit_seconds + final.fit_seconds,
                               chosen_on=f"a {holdout:.0%} holdout of train (no validation split), then refitted "
                                         f"on all {len(train_y)} rows at strength {final.strength:.3g}")


def fit_probe_on_splits(tensors: Dict[str, TensorDataset], *, num_classes: int, multilabel: bool = False,
                        class_weights: Optional[Sequence[float]] = None, device: Optional[torch.device] = None,
                        seed: int = 0, standardize: bool = True) -> ProbeResult:
    """The probe of a run's features: the strength chosen on val, or without one on a holdout of train.
    `standardize`: see training/probe.py fit_probe (False for a head that fine-tuning starts from)."""
    train, val = tensors["train"].tensors, tensors.get("val")
    try:
        if val is not None and len(val.tensors[1]):
            return fit_probe(*train, *val.tensors, num_classes=num_classes, multilabel=multilabel,
                             class_weights=class_weights, device=device, standardize=standardize)
        return fit_probe_on_train(*train, seed=seed, num_classes=num_classes, multilabel=multilabel,
                                  class_weights=class_weights, device=device, standardize=standardize)
    except ValueError as e:
        raise TransferError(f"the linear probe could not be fitted: {e}",
                            "check the data splits, or train the head by steps: transfer.head_solver=sgd "
                            "transfer.head_init=random") from e


def load_probe(head: nn.Module, linear: nn.Linear) -> None:
    """Copy the probe into the head's one Linear layer (a dropout before it may stay), in place: an optimizer built
    later, or already holding the parameters, trains these very tensors."""
    layers = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if len(layers) != 1 or layers[0].weight.shape != linear.weight.shape:
        shapes = [tuple(m.weight.shape) for m in layers]
        raise TransferError(f"a linear probe of shape {tuple(linear.weight.shape)} cannot start a head of Linear "
                            f"layers {shapes}", "use a linear head (model.head_hidden_dim=0), or "
                                                "transfer.head_init=random")
    with torch.no_grad():
        layers[0].weight.copy_(linear.weight.to(layers[0].weight))
        layers[0].bias.copy_(linear.bias.to(layers[0].bias))


class ProbeFit(pl.Callback):
    """Fits the probe on `features()` (the split name -> (features, labels) of train and, if the data has one, val)
    at fit setup and loads it into the module's head; `result` then holds it (None when resuming)."""

    def __init__(self, features: Callable[[], Dict[str, TensorDataset]], *, num_classes: int, multilabel: bool,
                 class_weights: Optional[Sequence[float]] = None, resuming: bool = False, seed: int = 0,
                 purpose: str = "solver"):
        self.features, self.num_classes, self.multilabel = features, int(num_classes), bool(multilabel)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.resuming, self.seed, self.purpose = resuming, int(seed), purpose
        self.result: Optional[ProbeResult] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.resuming or self.result is not None:
            return
        result = fit_probe_on_splits(self.features(), num_classes=self.num_classes, multilabel=self.multilabel,
                                     class_weights=self.class_weights, device=trainer.strategy.root_device,
                                     seed=self.seed, standardize=self.purpose == "solver")
        assert isinstance(pl_module, TransferModule)  # ProbeFit is a callback of TransferModule runs only
        load_probe(pl_module.model.head, result.linear)
        self.result = result
        log.info("head %s: linear probe with L2 strength %.3g chosen on %s (%s %.4f there), %d L-BFGS iterations "
                 "over %d strengths, %.2f s on %s", "solved" if self.purpose == "solver" else "initialized",
                 result.strength, result.chosen_on.split(" (")[0], result.metric, result.val_scores[result.index],
                 sum(result.iterations), len(result.strengths), result.fit_seconds, result.device)


class SolvedHead(torch.optim.Optimizer):
    """The optimizer of a head that ProbeFit solved at setup: its step changes nothing (lr 0), and the run takes
    exactly one, so the solve counts as the run's one optimizer step (checkpointing and resume key on that count)
    and the audit still checks that the head, and only the head, is what the run fits."""

    def __init__(self, params: Any):
        super().__init__([{"params": list(params), "name": "head"}], {"lr": 0.0, "weight_decay": 0.0})

    # torch types step(closure) as returning the closure's loss; this step changes nothing, so it never calls the
    # closure and has no loss to return.
    def step(self, closure: Optional[Callable[[], float]] = None) -> None:  # type: ignore[override]
        return None


class ProbeModule(TransferModule):
    """The module of a run whose head ProbeFit solves: its one epoch measures the solved head on the training
    features (train loss and accuracy) with one step of SolvedHead, then validates as every run does."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False  # no gradient steps: the head is already at the optimum

    def training_step(self, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self._shared_step(batch, "train")
        if batch_idx == 0:
            optimizer = self.optimizers()
            assert isinstance(optimizer, LightningOptimizer)  # configure_optimizers returns one optimizer
            optimizer.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return SolvedHead(self.model.head.parameters())

    def on_train_start(self) -> None:  # no LR schedule to follow
        pass


__all__ = ["ProbeFit", "ProbeModule", "SolvedHead", "fit_probe_on_train", "fit_probe_on_splits", "load_probe",
           "HOLDOUT"]
