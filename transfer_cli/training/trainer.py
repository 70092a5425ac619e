"""pl.Trainer from the trainer, logger and callbacks groups."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint, RichProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger

from transfer_cli.errors import TransferError
from transfer_cli.lifecycle.atomic_io import AtomicCheckpointIO
from transfer_cli.lifecycle.determinism import RebuildLoaderOnResume, SeedEveryBatch
from transfer_cli.lifecycle.run_state import AppendingCSVLogger, prune_metrics, resumed_global_step
from transfer_cli.lifecycle.signals import GracefulStop
from transfer_cli.training.ema import EMA

CHECKPOINT_DIR = "checkpoints"
# trainer.* keys that TransferModule applies to the network, not arguments of pl.Trainer.
MODULE_ARGS = ("compile", "channels_last")


def build_callbacks(cfg: Any, run_dir: Path, validate: bool = True) -> list[Callback]:
    """validate=False: the run has no validation split, so nothing is monitored and there is no best.ckpt."""
    cb = cfg.callbacks
    checkpoints = run_dir / CHECKPOINT_DIR
    # best.ckpt and last.ckpt come from two callbacks: Lightning 2.6's save_last only refreshes last.ckpt in
    # epochs where the monitored metric improved, so a plain save_last=True can leave a stale "last".
    callbacks: list[Callback] = []
    if validate:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, filename="best", monitor=cb.monitor, mode=cb.mode,
                                         save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False))
    if cb.save_last:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, filename="last", monitor=None, save_top_k=1,
                                         enable_version_counter=False))
    steps = int(OmegaConf.select(cfg, "callbacks.checkpoint_every_n_steps", default=0) or 0)
    if steps > 0:  # long epochs: last.ckpt also every N optimizer steps, so an interruption loses little
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, filename="last", monitor=None, save_top_k=1,
                                         every_n_train_steps=steps, enable_version_counter=False))
    # Resumability: per-batch RNG seeds from (seed, epoch, batch), and SIGTERM/SIGINT -> a resumable last.ckpt.
    callbacks += [SeedEveryBatch(int(cfg.seed)), RebuildLoaderOnResume()]
    callbacks.append(GracefulStop(checkpoints / "last.ckpt"))
    if cb.ema:
        callbacks.append(EMA(decay=cb.ema_decay))
    if cb.early_stopping_patience > 0:
        callbacks.append(EarlyStopping(monitor=cb.monitor, mode=cb.mode, patience=cb.early_stopping_patience))
    if cb.rich_progress and cfg.trainer.enable_progress_bar:
        callbacks.append(RichProgressBar(leave=True))
    if cfg.logger.csv or cfg.logger.tensorboard:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    return callbacks


def build_loggers(cfg: Any, run_dir: Path) -> list[Logger]:
    # The run dir already holds config.yaml when the CSV logger starts; its "not empty" warning is noise here.
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    # Frozen BatchNorm (transfer.bn=frozen) is in eval mode on purpose; Lightning warns about any eval module.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # A mid-epoch resume is exact here: lifecycle/determinism.py rebuilds the loader and skips the trained batches.
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    loggers: list[Logger] = []
    resumed_step = resumed_global_step(OmegaConf.select(cfg, "resume"))  # None unless resuming
    if resumed_step is not None:  # a resumed run writes into its own, non-empty checkpoint dir on purpose
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    if cfg.logger.csv:
        if resumed_step is None:
            loggers.append(CSVLogger(save_dir=str(run_dir), name="", version=""))  # run_dir/metrics.csv
        else:  # continue metrics.csv, without the rows logged after the checkpoint (they are logged again)
            prune_metrics(run_dir / "metrics.csv", resumed_step)
            loggers.append(AppendingCSVLogger(save_dir=str(run_dir), name="", version=""))
    if cfg.logger.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise TransferError("logger=tensorboard needs the tensorboard package", "pip install tensorboard")
        # On resume, TensorBoard hides the events an interrupted run wrote after its checkpoint (purge_step).
        purge = {} if resumed_step is None else {"purge_step": resumed_step}
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tb", version="", **purge))
    return loggers


def check_without_validation(cfg: Any) -> None:
    """Refuse, before any training, what needs a validation metric in a run that has none (data.val_fraction=0)."""
    conflicts = []
    if OmegaConf.select(cfg, "callbacks.test_ckpt", default="best") == "best":
        conflicts.append(("callbacks.test_ckpt=best picks its epoch on validation", "callbacks.test_ckpt=last"))
    monitor = str(cfg.callbacks.monitor)
    if cfg.callbacks.early_stopping_patience > 0 and monitor.startswith("val/"):
        conflicts.append((f"early stopping watches {monitor}", "callbacks.early_stopping_patience=0"))
    plateau_monitor = str(OmegaConf.select(cfg, "scheduler.monitor") or monitor)
    if cfg.scheduler.name == "plateau" and plateau_monitor.startswith("val/"):
        conflicts.append((f"scheduler=plateau watches {plateau_monitor}", "scheduler=cosine"))
    if conflicts:
        raise TransferError(
            "the run has no validation split (data.val_fraction=0), but " + "; ".join(why for why, _ in conflicts),
            "set " + " ".join(fix for _, fix in conflicts) + ", or keep a validation split: data.val_fraction=0.1",
        )


def build_trainer(cfg: Any, run_dir: Path, validate: bool = True) -> pl.Trainer:
    """validate=False: the data has no validation split, see check_without_validation."""
    if not validate:
        check_without_validation(cfg)
    args = OmegaConf.to_container(cfg.trainer, resolve=True)
    extra = args.pop("kwargs", {}) or {}  # +trainer.kwargs.X: any other pl.Trainer argument
    args.pop("auto_batch_size", None)  # ours, not a pl.Trainer argument: train() runs the Tuner
    for key in MODULE_ARGS:
        args.pop(key, None)
    args = {k: v for k, v in args.items() if v is not None}
    if "benchmark" not in args and not args.get("deterministic"):
        # Every batch has the configured input size, so cuDNN's per-shape autotuning pays for itself at once.
        args["benchmark"] = True
    args.update(extra)
    if not validate:  # no validation split: Lightning then never asks for the val loader
        args.update(limit_val_batches=0, num_sanity_val_steps=0)
    # Checkpoints are written to a temp file and renamed: a kill mid-write never damages the previous one.
    plugins = args.pop("plugins", None) or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    args["plugins"] = [*plugins, AtomicCheckpointIO()]
    loggers = build_loggers(cfg, run_dir)
    try:
        return pl.Trainer(
            default_root_dir=str(run_dir),
            logger=loggers if loggers else False,
            callbacks=build_callbacks(cfg, run_dir, validate),
            **args,
        )
    except TypeError as e:  # an unknown +trainer.kwargs.X
        raise TransferError(f"pl.Trainer rejected an argument: {e}", "check the names under trainer.kwargs")
    except (MisconfigurationException, ValueError, RuntimeError) as e:  # no GPU for trainer=gpu, a bad precision
        raise TransferError(
            f"the trainer could not start: {e}",
            "on a machine without a GPU use trainer=cpu (or trainer=auto); check trainer.precision/devices",
        ) from e
