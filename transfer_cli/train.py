"""`train(cfg)`: one training run from a composed config, returning its summary. Tests call this directly."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from transfer_cli.assembly.calibration import calibrate_checkpoints, positive_index
from transfer_cli.assembly.run import build_run
from transfer_cli.assembly.trainer import add_callbacks
from transfer_cli.atomic import atomic_write_json, atomic_write_text
from transfer_cli.config.resolve import resolve_run
from transfer_cli.config.schema import TrainConfig
from transfer_cli.errors import TransferError
from transfer_cli.reporting import print_config_tree, print_summary
from transfer_cli.resume.fit import fit
from transfer_cli.run_dir import check_outside_data, claim, held_dirs, is_child_rank, release
from transfer_cli.tracking.trackers import close_trackers, finish_trackers
from transfer_cli.run_files import RunLayout, RunSummary

log = logging.getLogger("transfer_cli")


def _metric(trainer: pl.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _write_curves(trainer: pl.Trainer, run_dir: Path, cfg: TrainConfig) -> None:
    """curves.png from metrics.csv; a plot never fails a run, so any error is only logged."""
    if not trainer.is_global_zero:
        return
    try:
        from transfer_cli.plots import write_curves

        path = write_curves(RunLayout(run_dir).metrics, title=f"{cfg.name}: {cfg.model.backbone}, {cfg.transfer.mode}")
        if path is not None:
            log.info("training curves: %s", path)
    except Exception as e:  # noqa: BLE001
        log.warning("could not write curves.png: %s: %s", type(e).__name__, e)


def _write_data_report(splits: Any, run_dir: Path) -> int:
    """The short data report (counts, imbalance, duplicates across splits) in the run dir and the log; like a
    plot, it never fails a run. Returns how many files sit in another split byte for byte (leakage)."""
    try:
        from transfer_cli.commands.data_report import write_data_report
        from transfer_cli.data.report import report_lines

        report = write_data_report(splits, run_dir, headers=False)
        for line in report_lines(report):
            log.info(line)
    except Exception as e:  # noqa: BLE001
        log.warning("could not write data_report.json: %s: %s", type(e).__name__, e)
        return 0
    leaked = int(report["duplicate_files_across_splits"])
    if leaked:  # the model is scored on images it trained on: val/test numbers read too high
        log.warning("leakage: %d files are byte-identical copies of files in another split (%d groups, listed in "
                    "%s); val/test scores count them as unseen. Remove the copies from all but one split.",
                    leaked, len(report["duplicates_across_splits"]), run_dir / "data_report.json")
    return leaked


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


def train(cfg: DictConfig | TrainConfig, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """Train the run `cfg` describes (a composed config, or a TrainConfig resolve_run made); returns its summary.
    `callbacks`: more Lightning callbacks for this fit (transfer tune's pruning)."""
    started = time.time()
    typed = resolve_run(cfg)  # at the entry; a resolved config passes through unchanged
    if not typed.paths.output_dir:
        raise TransferError("the run has no run dir (paths.output_dir is not set)",
                            "run it with `transfer train ...`, or set paths.output_dir=<folder>")
    run_dir = Path(typed.paths.output_dir)
    check_outside_data(run_dir, typed.data.source, typed.data.root)
    owned = not is_child_rank() and run_dir not in held_dirs()
    if owned:  # the run owns its dir while it trains (the CLI took it already, before Hydra wrote into it)
        claim(run_dir, resuming=bool(typed.resume))
    try:
        return _train(typed, run_dir, started, callbacks)
    finally:
        if owned:
            release(run_dir)


def _train(typed: TrainConfig, run_dir: Path, started: float, callbacks: Sequence[pl.Callback]) -> dict:
    print_config_tree(typed)
    atomic_write_text(RunLayout(run_dir).config, OmegaConf.to_yaml(OmegaConf.structured(typed)))

    run = build_run(typed, run_dir)
    positive_index(typed, run.splits.class_names)  # a threshold asked of a task it cannot decide fails now
    splits, images, datamodule, module, trainer = run.splits, run.images, run.datamodule, run.module, run.trainer
    add_callbacks(trainer, *callbacks)
    leaked = _write_data_report(splits, run_dir) if trainer.is_global_zero else 0
    if typed.trainer.auto_batch_size and not run.solved:  # a solved head fits all its rows at once
        from transfer_cli.assembly.trainer import scale_batch_size

        scale_batch_size(run)
    try:  # or continue cfg.resume; exits 143/130 on SIGTERM/SIGINT
        fit(trainer, module, datamodule, typed.resume, run_dir)
    except BaseException:
        close_trackers(trainer.loggers)  # a later run in this process (a sweep, a tune) must not log into these
        raise
    finally:  # also after a failure or an interrupt: the epochs that did finish are worth a look
        _write_curves(trainer, run_dir, typed)

    ckpt = trainer.checkpoint_callback if splits.val else None  # without validation the first one is last.ckpt
    best_path = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    best_score = float(ckpt.best_model_score) if ckpt is not None and ckpt.best_model_score is not None else None
    last = RunLayout(run_dir).last
    monitor = typed.callbacks.monitor

    def best_or_last(key: str) -> float | None:  # the best checkpoint's value if `key` chose it, else the last
        return best_score if key == monitor and best_score is not None else _metric(trainer, key)

    summary: RunSummary = {
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
        "duplicates_across_splits": leaked,  # byte-identical files in two splits: see data_report.json
        # seconds from the network built to the first optimizer step done (tracking/first_step.py)
        "first_step_latency_s": _seconds(run.first_step.first_step_s if run.first_step else None),
        "first_batch_latency_s": _seconds(run.first_step.first_batch_s if run.first_step else None),
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
    # after the test, which scores the weights as trained; each checkpoint gets its own (assembly/calibration.py)
    summary["calibration"] = calibrate_checkpoints(run, [best_path, summary["last_checkpoint"]])
    summary["wall_time_s"] = round(time.time() - started, 1)
    atomic_write_json(RunLayout(run_dir).summary, dict(summary))
    model_file = best_path or summary["last_checkpoint"]
    finish_trackers(trainer.loggers, run_dir, Path(model_file) if typed.logger.log_model and model_file else None)
    close_trackers(trainer.loggers)
    print_summary(summary)
    return summary


__all__ = ["train"]
