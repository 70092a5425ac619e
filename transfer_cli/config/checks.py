"""The values a config may hold: ranges and cross-key rules, checked with the schema before torch loads.

A type is checked by OmegaConf when the config composes; a value out of range (a negative LR, a zero batch, a
validation fraction of 1.5) would otherwise surface as a library's traceback seconds or an epoch later, or not at
all. Each rule names the key, the value and a value that works.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

from transfer_cli.config.schema import OWN_WARMUP_SCHEDULES
from transfer_cli.errors import TransferError, close_matches
from transfer_cli.precision import NAMES as PRECISIONS  # Lightning's names and aliases, and auto; torch-free



def _fail(key: str, value: Any, why: str, fix: str) -> None:
    raise TransferError(f"{key}={value} {why}", fix)


def _number(key: str, value: Any, low: Optional[float] = None, high: Optional[float] = None, *,
            low_open: bool = False, high_open: bool = False, example: Any = None) -> None:
    """low <= value <= high (or < where open); None bounds are unbounded."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and math.isfinite(float(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        span = f"in {lo}, {hi}" if low is not None and high is not None else (
            f"{'>' if low_open else '>='} {low:g}" if low is not None else f"{'<' if high_open else '<='} {high:g}")
        _fail(key, value, f"is out of range: it must be {span}", f"e.g. {key}={example if example is not None else low}")


def _each(key: str, values: Optional[Iterable[Any]], check: Callable[[str, Any], None]) -> None:
    for i, value in enumerate(values or []):
        check(f"{key}[{i}]", value)


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


def check_values(cfg: Any) -> None:
    """Every range and cross-key rule of a TrainConfig (config/schema.py)."""
    d, m, t, a, o, s, tr, cb = (cfg.data, cfg.model, cfg.transfer, cfg.augmentation, cfg.optimizer, cfg.scheduler,
                                cfg.trainer, cfg.callbacks)
    # data
    _number("data.val_fraction", d.val_fraction, 0, 1, high_open=True, example=0.2)
    _number("data.test_fraction", d.test_fraction, 0, 1, high_open=True, example=0.1)
    if d.val_fraction + d.test_fraction >= 1:
        raise TransferError(f"data.val_fraction={d.val_fraction} and data.test_fraction={d.test_fraction} leave "
                            "no training data", "keep their sum below 1, e.g. data.val_fraction=0.2 "
                                                "data.test_fraction=0.1")
    _number("data.batch_size", d.batch_size, 1, example=32)
    _number("data.eval_batch_size", d.eval_batch_size, 1, example=64)
    _number("data.max_bad_images", d.max_bad_images, 0, example=10)
    _number("data.image_size", d.image_size, 1, example=224)
    _number("data.crop_pct", d.crop_pct, 0, 1, low_open=True, example=0.875)
    _each("data.std", d.std, lambda k, v: _number(k, v, 0, low_open=True, example=0.5))
    # model
    _number("model.head_hidden_dim", m.head_hidden_dim, 0, example=0)
    _number("model.head_dropout", m.head_dropout, 0, 1, high_open=True, example=0.2)
    _number("model.drop_rate", m.drop_rate, 0, 1, high_open=True, example=0.2)
    _number("model.drop_path_rate", m.drop_path_rate, 0, 1, high_open=True, example=0.1)
    # transfer
    _number("transfer.freeze_stages", t.freeze_stages, 0, example=2)
    _number("transfer.unfreeze_every", t.unfreeze_every, 1, example=1)
    _number("transfer.backbone_lr_scale", t.backbone_lr_scale, 0, example=0.1)
    _number("transfer.layer_decay", t.layer_decay, 0, 1, low_open=True, example=0.75)
    _number("transfer.cache_views", t.cache_views, 0, example=0)
    if t.head_solver == "lbfgs" and lbfgs_blockers(cfg):
        raise TransferError("transfer.head_solver=lbfgs solves a linear head on cached features, but "
                            + "; ".join(lbfgs_blockers(cfg)), "transfer.head_solver=sgd (or auto: the epoch loop "
                            "where the solver cannot apply), or a linear head: model.head_hidden_dim=0 model.head_dropout=0 "
                            "augmentation.label_smoothing=0 callbacks.ema=false")
    if t.head_init == "probe" and m.head_hidden_dim > 0:
        raise TransferError(f"transfer.head_init=probe starts a linear head, but model.head_hidden_dim="
                            f"{m.head_hidden_dim} adds a hidden layer", "model.head_hidden_dim=0, or "
                            "transfer.head_init=random")
    # augmentation
    for key in ("hflip", "vflip", "rot90", "random_erasing", "mix_prob", "switch_prob", "perspective"):
        _number(f"augmentation.{key}", getattr(a, key), 0, 1, example=0.5)
    for key in ("color_jitter", "rotation", "noise_std", "mixup_alpha", "cutmix_alpha", "num_ops"):
        _number(f"augmentation.{key}", getattr(a, key), 0, example=0)
    _number("augmentation.magnitude", a.magnitude, 0, 30, example=9)
    _number("augmentation.label_smoothing", a.label_smoothing, 0, 1, high_open=True, example=0.1)
    for key, values, example in (("scale", a.scale, "[0.08,1.0]"), ("ratio", a.ratio, "[0.75,1.333]")):
        if len(values) != 2 or not 0 < values[0] <= values[1] or (key == "scale" and values[1] > 1):
            raise TransferError(f"augmentation.{key}={list(values)} is not a range [low, high] with 0 < low <= high"
                                + (" <= 1" if key == "scale" else ""), f"e.g. augmentation.{key}={example}")
    # optimizer and schedule
    _number("optimizer.lr", o.lr, 0, low_open=True, example=1e-3)
    _number("optimizer.weight_decay", o.weight_decay, 0, example=0.05)
    if o.name in ("sgd", "rmsprop") and not o.timm_opt:  # the optimizers that take a momentum
        _number("optimizer.momentum", o.momentum, 0, 1, high_open=True, example=0.9)
    _number("optimizer.eps", o.eps, 0, low_open=True, example=1e-8)
    _each("optimizer.betas", o.betas, lambda k, v: _number(k, v, 0, 1, high_open=True, example=0.9))
    _number("scheduler.warmup_epochs", s.warmup_epochs, 0, example=1)
    _number("scheduler.warmup_steps", s.warmup_steps, 0, example=100)
    _number("scheduler.warmup_start_factor", s.warmup_start_factor, 0, 1, example=0.0)
    _number("scheduler.min_lr_factor", s.min_lr_factor, 0, 1, example=0.0)
    _number("scheduler.step_epochs", s.step_epochs, 1, example=10)
    _number("scheduler.gamma", s.gamma, 0, low_open=True, example=0.1)
    _number("scheduler.pct_start", s.pct_start, 0, 1, low_open=True, high_open=True, example=0.3)
    _number("scheduler.div_factor", s.div_factor, 0, low_open=True, example=25)
    _number("scheduler.final_div_factor", s.final_div_factor, 0, low_open=True, example=1e4)
    _number("scheduler.patience", s.patience, 0, example=2)
    _each("scheduler.milestones", s.milestones, lambda k, v: _number(k, v, 0, example=10))
    # trainer and callbacks
    if not tr.fast_dev_run:
        _number("trainer.max_epochs", tr.max_epochs, 1, example=10)
    _number("trainer.min_epochs", tr.min_epochs, 0, example=1)
    _number("trainer.accumulate_grad_batches", tr.accumulate_grad_batches, 1, example=1)
    _number("trainer.log_every_n_steps", tr.log_every_n_steps, 1, example=10)
    _number("trainer.check_val_every_n_epoch", tr.check_val_every_n_epoch, 1, example=1)
    _number("trainer.gradient_clip_val", tr.gradient_clip_val, 0, example=1.0)
    if str(tr.precision) not in PRECISIONS:
        matches = close_matches(str(tr.precision), PRECISIONS, n=1)
        _fail("trainer.precision", tr.precision, "is not a precision Lightning knows"
              + (f"; did you mean {matches[0]}?" if matches else ""),
              f"trainer.precision={matches[0] if matches else '32-true'} (or bf16-mixed, 16-mixed)")
    _number("callbacks.early_stopping_patience", cb.early_stopping_patience, 0, example=5)
    _number("callbacks.checkpoint_every_n_steps", cb.checkpoint_every_n_steps, 0, example=500)
    _number("callbacks.ema_decay", cb.ema_decay, 0, 1, low_open=True, high_open=True, example=0.999)
    check_warmup(s)
    _targets("callbacks.extra", cb.extra)
    _targets("logger.extra", cfg.logger.extra)
    _monitor("callbacks.monitor", cb.monitor, cfg.task)
    _monitor("scheduler.monitor", s.monitor, cfg.task)
    # the rest
    _number("multilabel_threshold", cfg.multilabel_threshold, 0, 1, low_open=True, high_open=True, example=0.5)
    _number("eval.multicrop_fraction", cfg.eval.multicrop_fraction, 0, 1, low_open=True, example=0.875)
    _number("calibration.target_recall", cfg.calibration.target_recall, 0, 1, low_open=True, example=0.9)
    _number("calibration.bins", cfg.calibration.bins, 1, example=15)
    if cfg.task == "multilabel" and cfg.calibration.threshold_criterion != "none":
        raise TransferError(f"calibration.threshold_criterion={cfg.calibration.threshold_criterion} chooses the "
                            "decision threshold of a two-class task, but task=multilabel",
                            "multilabel_threshold=<value> sets the labels' threshold; "
                            "calibration.threshold_criterion=none")
    # transfer tune's workers
    tu = cfg.tune
    _number("tune.workers", tu.workers, 1, example=2)
    _number("tune.heartbeat_s", tu.heartbeat_s, 1, example=30)
    if tu.grace_s <= tu.heartbeat_s:
        _fail("tune.grace_s", tu.grace_s, f"is not longer than tune.heartbeat_s={tu.heartbeat_s}: a live worker's "
              "trial would be taken for dead between two heartbeats", f"e.g. tune.grace_s={4 * tu.heartbeat_s}")
    if tu.storage is not None and "://" not in tu.storage and not (tu.storage == "journal"
                                                                     or tu.storage.startswith("journal:")):
        _fail("tune.storage", tu.storage, "is neither an Optuna RDB URL nor a journal file",
              "tune.storage=journal (a journal file in tune.dir), tune.storage=journal:<file>, or a URL such as "
              "sqlite:///study.db or postgresql://user@host/db")


__all__ = ["check_values", "check_warmup", "lbfgs_blockers", "logged_metrics", "PRECISIONS"]
