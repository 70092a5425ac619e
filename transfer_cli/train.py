"""`train(cfg)`: one training run from a composed config, returning its summary. Tests call this directly."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from transfer_cli.assembly.run import build_run
from transfer_cli.atomic import atomic_write_json
from transfer_cli.config.compose import as_schema
from transfer_cli.config.schema import TrainConfig
from transfer_cli.errors import TransferError
from transfer_cli.reporting import print_config_tree, print_summary
from transfer_cli.resume.checkpoints import CHECKPOINT_DIR
from transfer_cli.resume.fit import fit

log = logging.getLogger("transfer_cli")


def _metric(trainer: pl.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


def _write_curves(trainer: pl.Trainer, run_dir: Path, cfg: TrainConfig) -> None:
    """curves.png from metrics.csv; a plot never fails a run, so any error is only logged."""
    if not trainer.is_global_zero:
        return
    try:
        from transfer_cli.plots import write_curves

        path = write_curves(run_dir / "metrics.csv", title=f"{cfg.name}: {cfg.model.backbone}, {cfg.transfer.mode}")
        if path is not None:
            log.info("training curves: %s", path)
    except Exception as e:  # noqa: BLE001
        log.warning("could not write curves.png: %s: %s", type(e).__name__, e)


def _probe_summary(run: Any, run_dir: Path, cfg: TrainConfig) -> dict | None:
    """The linear probe that solved or started the head: its strength, fit time and the grid's val curve (also
    as probe_curve.png); None when the run fitted none (or resumed past it)."""
    probe = run.probe
    if probe is None or probe.result is None:
        return None
    summary = {"use": "solved head" if probe.purpose == "solver" else "initial head", **probe.result.summary()}
    if run.trainer.is_global_zero:
        try:  # a plot never fails a run
            from transfer_cli.plots import PROBE_CURVE_NAME, write_probe_curve

            summary["curve"] = str(write_probe_curve(probe.result, run_dir / PROBE_CURVE_NAME,
                                                     title=f"{cfg.name}: {cfg.model.backbone}, linear probe"))
        except Exception as e:  # noqa: BLE001
            log.warning("could not write %s: %s: %s", "probe_curve.png", type(e).__name__, e)
    return summary


def _test_checkpoint(test_ckpt: str, best_path: str | None, last: Path) -> str | None:
    """The checkpoint the end-of-run test loads; None tests the weights as training left them."""
    # A small validation split picks its epoch noisily; `last` takes that pick out of the measurement (with
    # callbacks.ema both checkpoints hold EMA weights).
    if test_ckpt == "last":
        return str(last) if last.is_file() else None
    return best_path


def train(cfg: DictConfig | TrainConfig) -> dict:
    """Train the run `cfg` describes (a composed config, or the schema's TrainConfig); returns its summary."""
    started = time.time()
    typed = as_schema(cfg)
    if not typed.paths.output_dir:
        raise TransferError("the run has no run dir (paths.output_dir is not set)",
                            "run it with `transfer train ...`, or set paths.output_dir=<folder>")
    run_dir = Path(typed.paths.output_dir).expanduser().resolve()
    typed.paths.output_dir = str(run_dir)  # resolved once: checkpoints and config.yaml carry the real path
    print_config_tree(typed)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(typed), run_dir / "config.yaml")

    run = build_run(typed, run_dir)
    splits, images, datamodule, module, trainer = run.splits, run.images, run.datamodule, run.module, run.trainer
    if typed.trainer.auto_batch_size and not run.solved:  # a solved head fits all its rows at once
        from transfer_cli.tuner import scale_batch_size

        scale_batch_size(run)
    try:  # or continue cfg.resume; exits 143/130 on SIGTERM/SIGINT
        fit(trainer, module, datamodule, typed.resume, run_dir)
    finally:  # also after a failure or an interrupt: the epochs that did finish are worth a look
        _write_curves(trainer, run_dir, typed)

    ckpt = trainer.checkpoint_callback if splits.val else None  # without validation the first one is last.ckpt
    best_path = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    best_score = float(ckpt.best_model_score) if ckpt is not None and ckpt.best_model_score is not None else None
    last = run_dir / CHECKPOINT_DIR / "last.ckpt"
    monitor = typed.callbacks.monitor

    def best_or_last(key: str) -> float | None:  # the best checkpoint's value if `key` chose it, else the last
        return best_score if key == monitor and best_score is not None else _metric(trainer, key)

    summary: dict[str, Any] = {
        "name": typed.name,
        "val_acc": best_or_last("val/acc"),
        "test_acc": None,
        "epochs": int(trainer.current_epoch),
        "best_checkpoint": best_path,
        "last_checkpoint": str(last) if last.is_file() else None,
        "test_checkpoint": None,
        "run_dir": str(run_dir),
        "num_classes": len(splits.class_names),
        "class_names": list(splits.class_names),
        "train_size": len(splits.train),
        "val_size": len(splits.val),
        "test_size": len(splits.test),
        "feature_cache": run.feature_cache,
        "batch_size": int(datamodule.batch_size),  # trainer.auto_batch_size may have changed data.batch_size
        "bad_images": len(images.bad_images),
    }
    probe = _probe_summary(run, run_dir, typed)
    if probe is not None:
        summary["probe"] = probe
    if typed.task == "multilabel":  # acc is the exact-match rate there; mAP is the headline
        summary.update(task=typed.task, val_mAP=best_or_last("val/mAP"), val_f1=best_or_last("val/f1"),
                       test_mAP=None)
    if splits.test:
        summary["test_checkpoint"] = _test_checkpoint(typed.callbacks.test_ckpt, best_path, last)
        trainer.test(module, datamodule=datamodule, ckpt_path=summary["test_checkpoint"], verbose=False)
        summary["test_acc"] = _metric(trainer, "test/acc")
        if typed.task == "multilabel":
            summary["test_mAP"] = _metric(trainer, "test/mAP")
    summary["wall_time_s"] = round(time.time() - started, 1)
    atomic_write_json(run_dir / "summary.json", summary)
    print_summary(summary)
    return summary


__all__ = ["train"]
