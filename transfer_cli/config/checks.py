"""The values a config may hold: ranges and cross-key rules, checked with the schema before torch loads.

A type is checked by OmegaConf when the config composes; a value out of range (a negative LR, a zero batch, a
validation fraction of 1.5) would otherwise surface as a library's traceback seconds or an epoch later, or not at
all. Each rule names the key, the value and a value that works.
"""

from __future__ import annotations

from typing import Any, Optional

from transfer_cli.config.modes import require_mode_package
from transfer_cli.config.keys import Range, declared, example_of
from transfer_cli.config.schema import OWN_WARMUP_SCHEDULES, TrainConfig
from transfer_cli.errors import TransferError, close_matches
from transfer_cli.precision import NAMES as PRECISIONS  # Lightning's names and aliases, and auto; torch-free


def _fail(key: str, value: Any, why: str, fix: str) -> None:
    raise TransferError(f"{key}={value} {why}", fix)


def _in_range(key: str, value: Any, within: Range, example: Any) -> None:
    if value is not None and not within.holds(value):
        _fail(key, value, f"is out of range: it must be {within}", f"e.g. {key}={example}")


def _select(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_ranges(cfg: Any) -> None:
    """Every key's declared range (config/schema.py `key(within=...)`); a list's range holds for each element."""
    for dotted, field, spec in declared(TrainConfig):
        if spec.within is None or (spec.when is not None and not spec.when(cfg)):
            continue
        value, example = _select(cfg, dotted), example_of(field, spec)
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                _in_range(f"{dotted}[{i}]", item, spec.within, example)
        else:
            _in_range(dotted, value, spec.within, example)


def logged_metrics(task: str) -> list[str]:
    """The metric names a run logs (what callbacks.monitor and scheduler.monitor may watch)."""
    names = ["acc"] + (["f1", "f1_micro"] if task == "multilabel" else [])
    out = [f"train/{n}" for n in names] + ["train/loss_step", "train/loss_epoch"]
    out += [f"val/{n}" for n in ["loss", *names]] + (["val/mAP"] if task == "multilabel" else [])
    return out


def _monitor(key: str, value: Optional[str], task: str) -> None:
    if value is None:
        return
    known = logged_metrics(task)
    if value not in known:
        matches = close_matches(value, known, n=1)
        _fail(key, value, "is not a metric the run logs" + (f"; did you mean {matches[0]}?" if matches else ""),
              f"{key}={matches[0] if matches else 'val/acc'} (the run logs {', '.join(known)})")


def lbfgs_blockers(cfg: Any, cached: bool = True) -> list[str]:
    """What keeps the head from being solved as a linear probe: it must be linear on fixed features, and the
    objective must be the probe's (plain cross-entropy, or one sigmoid per label, with class weights). Whether
    the head trains on cached features is known once the run is planned (assembly/probe.py asks again)."""
    blockers = []
    if not cached:
        blockers.append("the head does not train on cached features (see the feature cache line)")
    if cfg.model.head_hidden_dim > 0:
        blockers.append(f"the head has a hidden layer (model.head_hidden_dim={cfg.model.head_hidden_dim})")
    if cfg.model.head_dropout > 0:
        blockers.append(f"the head has dropout (model.head_dropout={cfg.model.head_dropout})")
    if cfg.augmentation.label_smoothing > 0:
        blockers.append(f"augmentation.label_smoothing={cfg.augmentation.label_smoothing} changes the loss")
    if cfg.callbacks.ema:
        blockers.append("callbacks.ema averages the weights of training steps")
    if cfg.callbacks.swa:
        blockers.append("callbacks.swa averages the weights of training epochs")
    return blockers


def check_warmup(s: Any) -> None:
    """A scheduler record's warmup is one length, and none for a schedule whose rise is its warmup."""
    if s.warmup_steps and s.warmup_epochs:
        raise TransferError("scheduler.warmup_steps and scheduler.warmup_epochs are both set",
                            "keep one: scheduler.warmup_epochs=0 or scheduler.warmup_steps=0")
    if s.name in OWN_WARMUP_SCHEDULES and (s.warmup_epochs or s.warmup_steps):
        raise TransferError(f"scheduler={s.name} has its own warmup (scheduler.pct_start of the run)",
                            "scheduler.warmup_epochs=0 scheduler.warmup_steps=0, and set scheduler.pct_start")


def _targets(key: str, nodes: Any) -> None:
    """callbacks.extra / logger.extra: each node names its class, for Hydra's instantiate (assembly/extra.py)."""
    for name, node in (nodes or {}).items():
        if not isinstance(node, dict) or "_target_" not in node:
            example = "pytorch_lightning.callbacks.Timer" if key.startswith("callbacks") else \
                "pytorch_lightning.loggers.CSVLogger" + f" +{key}.{name}.save_dir=logs"
            raise TransferError(f"{key}.{name} has no _target_: an extra Lightning object is named by its class",
                                f"+{key}.{name}._target_=<module.Class>, e.g. +{key}.{name}._target_={example}")


def _folds(folds: int, fold: int) -> None:
    """data.folds / data.fold: k >= 2 folds, and a fold that exists."""
    if folds == 1:
        _fail("data.folds", folds, "is one fold: k-fold cross-validation holds out each of k >= 2 folds in turn",
              "data.folds=5 (or 0: no folds; transfer kfold k=5 trains them all)")
    if folds and fold >= folds:
        _fail("data.fold", fold, f"is not a fold of data.folds={folds} (they are 0 ... {folds - 1})",
              f"data.fold=0 ... data.fold={folds - 1}")
    if not folds and fold:
        _fail("data.fold", fold, "picks a fold, but data.folds=0 (no folds)",
              f"data.folds=<k> data.fold={fold} (k > {fold}), or leave data.fold out")


def check_values(cfg: Any) -> None:
    """Every key's range (declared on its schema field), then the rules that tie keys together."""
    check_ranges(cfg)
    require_mode_package(cfg.transfer.mode)
    d, m, t, a, s, tr, cb = (cfg.data, cfg.model, cfg.transfer, cfg.augmentation, cfg.scheduler, cfg.trainer,
                             cfg.callbacks)
    if d.val_fraction + d.test_fraction >= 1:
        raise TransferError(f"data.val_fraction={d.val_fraction} and data.test_fraction={d.test_fraction} leave "
                            "no training data", "keep their sum below 1, e.g. data.val_fraction=0.2 "
                                                "data.test_fraction=0.1")
    _folds(d.folds, d.fold)
    if t.head_solver == "lbfgs" and lbfgs_blockers(cfg):
        raise TransferError("transfer.head_solver=lbfgs solves a linear head on cached features, but "
                            + "; ".join(lbfgs_blockers(cfg)), "transfer.head_solver=sgd (or auto: the epoch loop "
                            "where the solver cannot apply), or a linear head: model.head_hidden_dim=0 model.head_dropout=0 "
                            "augmentation.label_smoothing=0 callbacks.ema=false callbacks.swa=false")
    if t.head_init == "probe" and m.head_hidden_dim > 0:
        raise TransferError(f"transfer.head_init=probe starts a linear head, but model.head_hidden_dim="
                            f"{m.head_hidden_dim} adds a hidden layer", "model.head_hidden_dim=0, or "
                            "transfer.head_init=random")
    for key, values, example in (("scale", a.scale, "[0.08,1.0]"), ("ratio", a.ratio, "[0.75,1.333]")):
        if len(values) != 2 or not 0 < values[0] <= values[1] or (key == "scale" and values[1] > 1):
            raise TransferError(f"augmentation.{key}={list(values)} is not a range [low, high] with 0 < low <= high"
                                + (" <= 1" if key == "scale" else ""), f"e.g. augmentation.{key}={example}")
    if str(tr.precision) not in PRECISIONS:
        matches = close_matches(str(tr.precision), PRECISIONS, n=1)
        _fail("trainer.precision", tr.precision, "is not a precision Lightning knows"
              + (f"; did you mean {matches[0]}?" if matches else ""),
              f"trainer.precision={matches[0] if matches else '32-true'} (or bf16-mixed, 16-mixed)")
    check_warmup(s)
    _targets("callbacks.extra", cb.extra)
    if cb.ema and cb.swa:
        raise TransferError("callbacks.ema and callbacks.swa both replace the weights that validation, checkpoints "
                            "and the test see, each by its own average", "keep one: callbacks.ema=false or "
                            "callbacks.swa=false")
    for name, node in (cb.extra or {}).items():
        if str(node["_target_"]).rsplit(".", 1)[-1] == "StochasticWeightAveraging":
            raise TransferError(f"callbacks.extra.{name}: Lightning's StochasticWeightAveraging replaces the run's LR "
                                "schedule, adds an epoch, and leaves best.ckpt and the test with the raw weights "
                                "(training/swa.py says why)", f"callbacks.swa=true callbacks.swa_start=0.75 (and "
                                f"scheduler=constant for SWA's constant LR), without +callbacks.extra.{name}")
    _targets("logger.extra", cfg.logger.extra)
    _monitor("callbacks.monitor", cb.monitor, cfg.task)
    _monitor("scheduler.monitor", s.monitor, cfg.task)
    if cfg.task == "multilabel" and cfg.calibration.threshold_criterion != "none":
        raise TransferError(f"calibration.threshold_criterion={cfg.calibration.threshold_criterion} chooses the "
                            "decision threshold of a two-class task, but task=multilabel",
                            "multilabel_threshold=<value> sets the labels' threshold; "
                            "calibration.threshold_criterion=none")
    tu = cfg.tune
    if tu.grace_s <= tu.heartbeat_s:
        _fail("tune.grace_s", tu.grace_s, f"is not longer than tune.heartbeat_s={tu.heartbeat_s}: a live worker's "
              "trial would be taken for dead between two heartbeats", f"e.g. tune.grace_s={4 * tu.heartbeat_s}")
    if tu.storage is not None and "://" not in tu.storage and not (tu.storage == "journal"
                                                                     or tu.storage.startswith("journal:")):
        _fail("tune.storage", tu.storage, "is neither an Optuna RDB URL nor a journal file",
              "tune.storage=journal (a journal file in tune.dir), tune.storage=journal:<file>, or a URL such as "
              "sqlite:///study.db or postgresql://user@host/db")


__all__ = ["check_ranges", "check_values", "check_warmup", "lbfgs_blockers", "logged_metrics", "PRECISIONS"]
