"""pl.Trainer of a run from the trainer, logger and callbacks groups."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import Logger

from transfer_cli.assembly.extra import instantiate_extra
from transfer_cli.config.schema import TrainConfig
from transfer_cli.errors import TransferError
from transfer_cli.resume.checkpoint_io import AtomicCheckpointIO
from transfer_cli.resume.checkpoints import checkpoint_step
from transfer_cli.resume.replay import ResumePoint, SeedEveryBatch
from transfer_cli.resume.signals import GracefulStop
from transfer_cli.resume.step_checkpoint import StepCheckpoint
from transfer_cli.tracking.progress import ThrottledProgressBar
from transfer_cli.tracking.trackers import (
    TrackerContext, TrackerStart, build_trackers, enabled_trackers, flatten, read_runs,
)
from transfer_cli.training.ema import EMA
from transfer_cli.training.swa import SWA
from transfer_cli.run_files import RunLayout

# trainer.* keys that are ours, not arguments of pl.Trainer: applied to the network (assembly/model.py), or the
# Tuner's batch-size search (train.py)
OWN_TRAINER_KEYS = ("compile", "channels_last", "auto_batch_size", "kwargs")

log = logging.getLogger("transfer_cli")


def build_callbacks(cfg: TrainConfig, run_dir: Path, resume_point: ResumePoint, validate: bool = True
                    ) -> list[Callback]:
    """validate=False: the run has no validation split, so nothing is monitored and there is no best.ckpt."""
    cb = cfg.callbacks
    files = RunLayout(run_dir)
    checkpoints = files.checkpoints
    # best.ckpt and last.ckpt come from two callbacks: Lightning 2.6's save_last only refreshes last.ckpt in
    # epochs where the monitored metric improved, so a plain save_last=True can leave a stale "last".
    callbacks: list[Callback] = []
    if validate:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, filename="best", monitor=cb.monitor, mode=cb.mode,
                                         save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False))
    if cb.save_last:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, filename="last", monitor=None, save_top_k=1,
                                         enable_version_counter=False))
    # Resumability: per-batch RNG seeds from (seed, epoch, batch), where an interrupted epoch stopped, and
    # SIGTERM/SIGINT -> a resumable last.ckpt.
    callbacks += [SeedEveryBatch(int(cfg.seed)), resume_point, GracefulStop(files.last)]
    if cb.checkpoint_every_n_steps > 0:  # long epochs: last.ckpt also every N optimizer steps
        # after resume_point in the list: its batch count must include the batch just trained when this saves
        callbacks.append(StepCheckpoint(files.last, cb.checkpoint_every_n_steps))
    if cb.early_stopping_patience > 0:
        callbacks.append(EarlyStopping(monitor=cb.monitor, mode=cb.mode, patience=cb.early_stopping_patience))
    if cb.rich_progress and cfg.trainer.enable_progress_bar:
        callbacks.append(ThrottledProgressBar(leave=True))
    if enabled_trackers(cfg.logger):
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
        # the resolved config to MLflow / W&B as params, and their run ids to trackers.json (for resume)
        callbacks.append(TrackerStart(run_dir, flatten(dataclasses.asdict(cfg))))
    return callbacks + instantiate_extra(cfg.callbacks.extra, "callbacks.extra", Callback)


def build_loggers(cfg: TrainConfig, run_dir: Path) -> list[Logger]:
    # Frozen BatchNorm (transfer.bn=frozen) is in eval mode on purpose; Lightning warns about any eval module.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # A mid-epoch resume is exact here: resume/replay.py skips the batches the interrupted epoch trained on.
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    loggers: list[Logger] = []
    resumed_step = checkpoint_step(cfg.resume)  # None unless resuming
    if resumed_step is not None:  # a resumed run writes into its own, non-empty checkpoint dir on purpose
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # logger=<names> (tracking/trackers.py TRACKERS); a resumed run continues its tracker runs (trackers.json)
    context = TrackerContext(run_dir=run_dir, experiment=cfg.logger.experiment or cfg.name,
                             run_name=cfg.logger.run_name or f"{cfg.name}/{run_dir.name}", tags=dict(cfg.logger.tags),
                             resume_step=resumed_step, saved=read_runs(run_dir) if resumed_step is not None else {})
    loggers += build_trackers(cfg.logger, context)
    loggers += instantiate_extra(cfg.logger.extra, "logger.extra", Logger)
    return loggers


def check_without_validation(cfg: TrainConfig) -> None:
    """Refuse, before any training, what needs a validation metric in a run that has none (data.val_fraction=0)."""
    conflicts = []
    if cfg.callbacks.test_ckpt == "best":
        conflicts.append(("callbacks.test_ckpt=best picks its epoch on validation", "callbacks.test_ckpt=last"))
    monitor = str(cfg.callbacks.monitor)
    if cfg.callbacks.early_stopping_patience > 0 and monitor.startswith("val/"):
        conflicts.append((f"early stopping watches {monitor}", "callbacks.early_stopping_patience=0"))
    plateau_monitor = str(cfg.scheduler.monitor or monitor)
    if cfg.scheduler.name == "plateau" and plateau_monitor.startswith("val/"):
        conflicts.append((f"scheduler=plateau watches {plateau_monitor}", "scheduler=cosine"))
    if conflicts:
        raise TransferError(
            "the run has no validation split (data.val_fraction=0), but " + "; ".join(why for why, _ in conflicts),
            "set " + " ".join(fix for _, fix in conflicts) + ", or keep a validation split: data.val_fraction=0.1",
        )


def trainer_args(cfg: TrainConfig, validate: bool) -> dict[str, Any]:
    """pl.Trainer's keyword arguments from the trainer group (+trainer.kwargs.X: any other one)."""
    args = {k: v for k, v in dataclasses.asdict(cfg.trainer).items() if k not in OWN_TRAINER_KEYS and v is not None}
    if "benchmark" not in args and not args.get("deterministic"):
        # Every batch has the configured input size, so cuDNN's per-shape autotuning pays for itself at once.
        args["benchmark"] = True
    args.update(cfg.trainer.kwargs or {})
    if not validate:  # no validation split: Lightning then never asks for the val loader
        args.update(limit_val_batches=0, num_sanity_val_steps=0)
    # Checkpoints are written to a temp file and renamed: a kill mid-write never damages the previous one.
    plugins = args.pop("plugins", None) or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    args["plugins"] = [*plugins, AtomicCheckpointIO()]
    return args


def add_callbacks(trainer: pl.Trainer, *callbacks: Callback) -> None:
    """Callbacks that need the trainer's device or the built run join it after construction. Lightning sets
    `Trainer.callbacks` in its constructor without declaring the attribute, so type checkers cannot see it; this is
    the one place that appends to it (every training run of the suite goes through it)."""
    trainer.callbacks.extend(callbacks)  # type: ignore[attr-defined]


def build_trainer(cfg: TrainConfig, run_dir: Path, validate: bool = True,
                  resume_point: Optional[ResumePoint] = None) -> pl.Trainer:
    """validate=False: the data has no validation split, see check_without_validation. `resume_point`: the
    callback the training sampler asks where a restored epoch resumes (a new one when not given)."""
    if not validate:
        check_without_validation(cfg)
    args = trainer_args(cfg, validate)
    callbacks = build_callbacks(cfg, run_dir, resume_point or ResumePoint(), validate)
    try:
        trainer = pl.Trainer(default_root_dir=str(run_dir), logger=build_loggers(cfg, run_dir) or False,
                             callbacks=callbacks, **args)
    except TypeError as e:  # an unknown +trainer.kwargs.X
        raise TransferError(f"pl.Trainer rejected an argument: {e}", "check the names under trainer.kwargs")
    except (MisconfigurationException, ValueError, RuntimeError) as e:  # no GPU for trainer=gpu, a bad precision
        raise TransferError(
            f"the trainer could not start: {e}",
            "on a machine without a GPU use trainer=cpu (or trainer=auto); check trainer.precision/devices",
        ) from e
    if cfg.callbacks.ema:  # built now that the device is known: the average lives where the weights train
        add_callbacks(trainer, EMA(decay=cfg.callbacks.ema_decay, device=trainer.strategy.root_device))
    if cfg.callbacks.swa:
        add_callbacks(trainer, SWA(start=cfg.callbacks.swa_start, device=trainer.strategy.root_device))
    return trainer


def scale_batch_size(run: Any) -> int:
    """trainer.auto_batch_size: Lightning's Tuner doubles data.batch_size until a step runs out of memory (or
    the batch holds the whole training set), and the run continues with the largest that fit."""
    from pytorch_lightning.tuner import Tuner

    found = Tuner(run.trainer).scale_batch_size(run.module, datamodule=run.datamodule, mode="power")
    if found is None:  # fast_dev_run: Lightning skips the search
        return int(run.datamodule.batch_size)
    if run.cfg.data.eval_batch_size == 2 * run.cfg.data.batch_size:  # the default relation: it follows the batch
        run.datamodule.eval_batch_size = 2 * found
    log.info("auto batch size: data.batch_size=%d", found)
    return int(found)


__all__ = ["add_callbacks", "scale_batch_size", "build_trainer", "build_callbacks", "build_loggers", "check_without_validation", "trainer_args"]
