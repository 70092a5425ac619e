"""`transfer kfold [k=5] [output=DIR] <transfer train overrides>`: k-fold cross-validation in one command.

Fold i is the run `transfer train <overrides> data.folds=k data.fold=i` in `<folder>/fold_i` (data/splits.py
fold_splits: the test split held out as without folds, the rest dealt into k stratified folds by data.split_seed,
fold i val). The folds run one after another in this process, each through `transfer train`'s own Hydra entry
(hydra_app.run_train_app), rather than as one Hydra multirun: a multirun cannot mix new jobs with resumed ones (a
resume composes the checkpoint's config, and refuses -m) and refuses a sweep dir that holds jobs, while running
the same command again on the same folder must skip the finished folds and continue the interrupted one with
`transfer train resume=<fold dir>`. Each fold still leaves a sweep job's job.json, so `transfer sweep-summary`
reads the folder like any sweep.

At the end it writes, atomically, `ensemble.json` (the k fold models as one ensemble for eval, predict and export:
commands/members.py) and `kfold.json` (each fold's held-out val metrics from its summary.json, their mean and
std), and prints them as a table.
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

from transfer_cli.atomic import atomic_write_json
from transfer_cli.commands.members import ENSEMBLE_FILE
from transfer_cli.config.args import ANY_OVERRIDE, POSITIVE_INT, Option, parse_command_args
from transfer_cli.config.overrides import override_key, parse, take
from transfer_cli.errors import TransferError
from transfer_cli.run_files import RunLayout, read_summary
from transfer_cli.sweeps.records import RECORD_NAME

KFOLD_FILE = "kfold.json"
OPTIONS = {
    "k": Option(POSITIVE_INT, 5, help="the number of folds, 2 or more", example="5"),
    "output": Option(str, None, help="the k-fold's folder (default: multirun/<name>/kfold_<date>_<time>); the same "
                     "folder again continues it", example="multirun/kfold"),
}
# summary.json numbers reported per fold, with their mean and std: the held-out fold's (val_*) and the test's
METRICS = ("val_acc", "val_mAP", "val_f1", "test_acc", "test_mAP")
# What a k-fold decides itself, per fold; a train argument for it would contradict it
OWN_KEYS = {"data.folds": "k=<folds>", "data.fold": "nothing: every fold runs", "resume": "output=<the k-fold's "
            "folder> (the same command again continues it)", "hydra.run.dir": "output=<folder> (fold_<i> inside)"}


def fold_dir(folder: Path, fold: int) -> Path:
    return folder / f"fold_{fold}"


def _refuse_own_keys(overrides: list[str], k: int) -> None:
    if k < 2:
        raise TransferError(f"k={k}: k-fold cross-validation holds out each of k >= 2 folds in turn", "k=5")
    for arg in overrides:
        if override_key(arg) in OWN_KEYS:
            key = override_key(arg)
            raise TransferError(f"`transfer kfold` sets {key} itself", f"drop {arg}; use {OWN_KEYS[key]}")
    for ov in parse([o for o in overrides if "=" in o]):
        if ov.is_sweep_override():
            raise TransferError(f"'{ov.input_line}' is a sweep; one k-fold cross-validates one config",
                                "run one `transfer kfold` per value (each with its own output=)")


def _folder(chosen: Optional[str], name: str) -> Path:
    from transfer_cli.outputs import output_dir
    from transfer_cli.run_dir import fresh_dir

    if chosen:
        return output_dir(chosen)  # refused when it is a file or a run's own dir
    return Path(fresh_dir(f"multirun/{name}/kfold_{time.strftime('%Y-%m-%d_%H-%M-%S')}")).resolve()


def _check_folder(folder: Path, k: int, overrides: list[str]) -> None:
    """A k-fold writes into a folder of its own: a new or empty one, or its own of the same k and overrides."""
    from transfer_cli.run_dir import LOCK_NAME

    record = folder / KFOLD_FILE
    again = f"transfer kfold k={k} output={shlex.quote(str(folder))}"
    if record.is_file():
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError) as e:
            raise TransferError(f"{record} is not readable JSON ({e}), so the folder's k-fold is unknown",
                                "output=<a new folder>, or move the folder's kfold.json back from a copy") from None
        if saved.get("k") != k or saved.get("overrides") != overrides:
            raise TransferError(
                f"{folder} holds a k-fold of k={saved.get('k')} with other overrides ("
                f"{' '.join(saved.get('overrides') or []) or 'none'}); its folds would mix two configs",
                f"continue it with its own arguments: {saved.get('command', again)}; or output=<a new folder>")
        return
    if folder.is_dir() and any(p.name != LOCK_NAME for p in folder.iterdir()):
        raise TransferError(f"{folder} holds files of something else than a k-fold; its folds would be written "
                            "among them", "output=<a new or empty folder>, or leave output out (a new folder)")


def fold_state(run_dir: Path) -> str:
    """done (summary.json) | resume (a checkpoint to continue from) | new (nothing trained yet) | stuck."""
    from transfer_cli.resume.checkpoints import checkpoints_in
    from transfer_cli.run_dir import holds_a_run

    if RunLayout(run_dir).summary.is_file():
        return "done"
    if run_dir.is_dir() and checkpoints_in(run_dir):
        return "resume"
    return "stuck" if run_dir.is_dir() and holds_a_run(run_dir) else "new"


def _train_fold(args: list[str]) -> None:
    """One `transfer train`, in this process. run_train_app rewrites sys.argv for hydra.main, and reads argv[0]
    as the entry point that DDP re-launches: each fold starts from this command's own argv."""
    from transfer_cli.hydra_app import run_train_app

    saved = list(sys.argv)
    try:
        run_train_app(args)
    finally:
        sys.argv = saved
        if "torch" in sys.modules:  # the fold's network and loaders are gone: hand their GPU memory back
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _record_job(run_dir: Path, overrides: list[str], monitor: str, mode: str, wall: Optional[float]) -> None:
    """The fold as a sweep job (sweeps/records.py), so `transfer sweep-summary <folder>` reads the k-fold."""
    from transfer_cli.sweeps.records import JobRecord, run_outcome, write_record

    outcome = run_outcome(run_dir, monitor, mode)
    write_record(JobRecord(job=run_dir.name, overrides=overrides, status="ok", monitor=monitor, mode=mode,
                           best=outcome["best"], epochs=outcome["epochs"], wall_time_s=wall, run_dir=str(run_dir),
                           extra=outcome["extra"]))


def run_folds(folder: Path, k: int, train_args: list[str], monitor: str, mode: str, again: str) -> list[str]:
    """Train (or continue) every fold that has not finished; returns what happened to each."""
    done = []
    for i in range(k):
        run_dir = fold_dir(folder, i)
        state = fold_state(run_dir)
        if state == "done":
            print(f"kfold: fold {i} finished earlier ({run_dir}): skipped", flush=True)
            if not (run_dir / RECORD_NAME).is_file():  # finished, but this command stopped before recording it
                _record_job(run_dir, [*train_args, f"data.folds={k}", f"data.fold={i}"], monitor, mode, None)
            done.append("finished earlier")
            continue
        if state == "stuck":
            raise TransferError(f"fold {i} ({run_dir}) stopped before its first checkpoint: nothing to continue from",
                                f"remove it and run again: rm -r {shlex.quote(str(run_dir))} && {again}")
        fold_args = [*train_args, f"data.folds={k}", f"data.fold={i}"]
        args = [f"resume={run_dir}"] if state == "resume" else [*fold_args, f"hydra.run.dir={run_dir}"]
        print(f"kfold: fold {i} of {k}: {'continuing' if state == 'resume' else 'training'} in {run_dir}", flush=True)
        started = time.time()
        try:
            _train_fold(args)
        except SystemExit as stop:  # a failed or interrupted fold: the error is printed; say how to go on
            if stop.code:
                print(f"kfold: fold {i} stopped; the finished folds are kept. Continue with: {again}",
                      file=sys.stderr, flush=True)
            raise
        _record_job(run_dir, fold_args, monitor, mode, round(time.time() - started, 1))
        done.append("resumed" if state == "resume" else "trained")
    return done


def results(folder: Path, k: int) -> tuple[list[dict], dict[str, dict]]:
    """(each fold's numbers from its summary.json, {metric: {mean, std, values}}); std is the sample std (n - 1)."""
    folds = []
    for i in range(k):
        summary: dict[str, Any] = dict(read_summary(fold_dir(folder, i)))  # read by the names in METRICS
        row: dict[str, Any] = {"fold": i, "run_dir": fold_dir(folder, i).name, "epochs": summary.get("epochs"),
               "train_size": summary.get("train_size"), "val_size": summary.get("val_size"),
               "test_size": summary.get("test_size")}
        row.update({m: summary[m] for m in METRICS if summary.get(m) is not None})
        folds.append(row)
    stats = {}
    for m in METRICS:
        values = [float(row[m]) for row in folds if m in row]
        if len(values) == k:
            stats[m] = {"mean": statistics.fmean(values), "std": statistics.stdev(values), "values": values}
        elif values:  # a mean over some folds would read as the k-fold's
            print(f"kfold: {m} is missing from the summary.json of {k - len(values)} fold(s): no mean reported",
                  file=sys.stderr)
    return folds, stats


def print_table(folder: Path, folds: list[dict], stats: dict[str, dict], done: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"transfer kfold: {len(folds)} folds in {folder}", title_style="bold")
    for column in ("fold", *stats, "epochs", "val size", "this time"):
        table.add_column(column, justify="left" if column in ("fold", "this time") else "right")
    for row, what in zip(folds, done):
        table.add_row(str(row["fold"]), *(f"{row[m]:.4f}" for m in stats), str(row.get("epochs", "")),
                      str(row.get("val_size", "")), what)
    table.add_row("mean ± std", *(f"{s['mean']:.4f} ± {s['std']:.4f}" for s in stats.values()), "", "", "",
                  style="bold")
    Console(width=None if sys.stdout.isatty() else 132).print(table)


def kfold_command(args: list[str]) -> None:
    from transfer_cli.config.compose import as_schema, compose, own_data_defaults
    from transfer_cli.run_dir import claim, release

    values, overrides = parse_command_args("kfold", args, OPTIONS, ANY_OVERRIDE)
    k = values["k"]
    sweep_dir, overrides = take(overrides, "hydra.sweep.dir")  # Hydra's name for a sweep's folder, as output=
    if sweep_dir and values["output"] and Path(sweep_dir).resolve() != Path(values["output"]).resolve():
        raise TransferError("output= and hydra.sweep.dir= name two folders", "keep one: output=<folder>")
    _refuse_own_keys(overrides, k)
    train_args = own_data_defaults(overrides)  # as `transfer train` composes these overrides
    cfg = as_schema(compose([*train_args, f"data.folds={k}", "data.fold=0"]))  # every value checked before torch
    folder = _folder(values["output"] or sweep_dir, cfg.name)
    _check_folder(folder, k, overrides)
    claim(folder, resuming=True)  # one k-fold at a time in a folder (a lock; nothing of a run is written here)
    again = " ".join(["transfer kfold", f"k={k}", f"output={shlex.quote(str(folder))}",
                      *(shlex.quote(o) for o in overrides)])
    try:
        if not (folder / KFOLD_FILE).is_file():  # what a later run of the command checks its arguments against
            atomic_write_json(folder / KFOLD_FILE, {"k": k, "overrides": overrides, "command": again,
                                                    "complete": False})
        if any(fold_state(fold_dir(folder, i)) != "done" for i in range(k)):
            from transfer_cli.assembly.sources import discover

            discover(cfg.data, cfg.task)  # the data and its folds, before torch loads: too few images fail now
        done = run_folds(folder, k, train_args, cfg.callbacks.monitor, cfg.callbacks.mode, again)
        folds, stats = results(folder, k)
        atomic_write_json(folder / ENSEMBLE_FILE, {"members": [fold_dir(folder, i).name for i in range(k)],
                                                   "weights": None})
        atomic_write_json(folder / KFOLD_FILE, {
            "k": k, "overrides": overrides, "command": again, "complete": True, "monitor": cfg.callbacks.monitor,
            "std": "sample standard deviation (n - 1) over the folds", "metrics": stats, "folds": folds})
    finally:
        release(folder)
    print_table(folder, folds, stats, done)
    print(f"wrote {folder / KFOLD_FILE} and {folder / ENSEMBLE_FILE} (the {k} fold models as one ensemble)")
    print(f"score the ensemble: transfer eval ckpt={shlex.quote(str(folder))}" +
          ("" if any(r.get("test_size") for r in folds) else " data.root=<held-out images> (there is no test split)"))


__all__ = ["kfold_command", "fold_state", "fold_dir", "results", "KFOLD_FILE", "METRICS"]
