"""`transfer lr-find`: Lightning's learning-rate finder on the configured run.

The LR range test trains from the run's starting weights for `num_training` steps while the LR grows
exponentially from min_lr to max_lr, then restores the weights; the suggestion is the LR where the loss fell
fastest. Lightning's finder drives every parameter group at the same LR, so with transfer.backbone_lr_scale or
layer_decay the suggestion is the head's LR (optimizer.lr), and the backbone keeps its scale of it in training.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transfer_cli.atomic import atomic_write_json, atomic_write_text
from transfer_cli.config.args import (
    ANY_OVERRIDE, POSITIVE_FLOAT, POSITIVE_INT, Option, parse_command_args, take_run_dir,
)
from transfer_cli.errors import TransferError

log = logging.getLogger("transfer_cli")

PLOT_NAME = "lr_find.png"
RESULT_NAME = "lr_find.json"


@dataclass
class FinderOptions:
    """`transfer lr-find` arguments that are not config overrides."""

    output: str | None = None  # default: outputs/lr_find/<date>_<time>
    min_lr: float = 1e-7
    max_lr: float = 1.0
    num_training: int = 100


OPTIONS = {
    "output": Option(str, None, help="the folder for lr_find.png and lr_find.json", example="lr_find_out"),
    "min_lr": Option(POSITIVE_FLOAT, FinderOptions.min_lr, help="a positive learning rate"),
    "max_lr": Option(POSITIVE_FLOAT, FinderOptions.max_lr, help="a positive learning rate"),
    "num_training": Option(POSITIVE_INT, FinderOptions.num_training, help="a number of steps"),
}


def split_options(args: list[str]) -> tuple[FinderOptions, list[str]]:
    """(the finder's own key=value options, the config overrides)."""
    values, overrides = parse_command_args("lr-find", args, OPTIONS, ANY_OVERRIDE)
    options = FinderOptions(**values)
    if not options.min_lr < options.max_lr:
        raise TransferError(f"min_lr={options.min_lr} and max_lr={options.max_lr} make no range",
                            "0 < min_lr < max_lr, e.g. min_lr=1e-7 max_lr=1")
    if options.num_training < 2:
        raise TransferError(f"num_training={options.num_training} is too few steps", "num_training=100")
    return options, overrides


@dataclass
class LRFindResult:
    suggestion: float | None
    lrs: list[float]
    losses: list[float]
    plot: Path
    result: Path

    @property
    def override(self) -> str | None:
        return None if self.suggestion is None else f"optimizer.lr={self.suggestion:.3g}"


def find_lr(cfg: Any, out_dir: Path, options: FinderOptions) -> LRFindResult:
    """Lightning's Tuner.lr_find on build_run(cfg): writes lr_find.png (loss vs LR) and lr_find.json."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from omegaconf import OmegaConf
    from pytorch_lightning.tuner import Tuner

    from transfer_cli.assembly.run import build_run
    from transfer_cli.config.resolve import replace_at, resolve_run
    from transfer_cli.plots import save_figure
    from transfer_cli.tracking.trackers import TRACKERS

    cfg = resolve_run(cfg, out_dir)
    from transfer_cli.assembly.data import cache_plan
    from transfer_cli.assembly.probe import head_solver

    if head_solver(cfg, cache_plan(cfg)[0])[0]:
        raise TransferError(f"this run's head is solved, not stepped (transfer.head_solver={cfg.transfer.head_solver} "
                            "picks lbfgs for a linear head on cached features): it has no learning rate to find",
                            "to find the LR of the epoch loop instead, add transfer.head_solver=sgd")
    out_dir.mkdir(parents=True, exist_ok=True)
    # no tracker runs: the finder's curve goes to lr_find.json instead
    cfg = replace_at(cfg, {f"logger.{tracker}": False for tracker in TRACKERS})
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    run = build_run(cfg, out_dir)
    trainer = run.trainer
    # Only training losses matter: enough epochs for num_training steps on a small data set, no validation.
    trainer.fit_loop.max_epochs = max(trainer.max_epochs or 1, options.num_training)
    trainer.check_val_every_n_epoch = options.num_training + 1
    trainer.num_sanity_val_steps = 0
    finder = Tuner(trainer).lr_find(
        run.module, datamodule=run.datamodule, min_lr=options.min_lr, max_lr=options.max_lr,
        num_training=options.num_training, update_attr=False,
    )
    if finder is None:
        raise TransferError("the LR finder does not run with trainer.fast_dev_run", "drop debug=fast_dev_run")
    suggestion = finder.suggestion()
    if suggestion is not None and not math.isfinite(suggestion):
        suggestion = None
    fig = finder.plot(suggest=True)
    ax = fig.axes[0]
    ax.set_title(f"LR range test: {cfg.model.backbone}, {cfg.optimizer.name}"
                 + (f", suggested lr {suggestion:.3g}" if suggestion is not None else ", no suggestion"))
    save_figure(fig, out_dir / PLOT_NAME, dpi=120, bbox_inches="tight")
    plt.close(fig)
    lrs = [float(v) for v in finder.results["lr"]]
    losses = [float(v) for v in finder.results["loss"]]
    result = LRFindResult(suggestion, lrs, losses, out_dir / PLOT_NAME, out_dir / RESULT_NAME)
    payload = {"suggestion": suggestion, "override": result.override, "lr": lrs, "loss": losses,
               "min_lr": options.min_lr, "max_lr": options.max_lr, "num_training": options.num_training}
    atomic_write_json(result.result, payload)
    return result


def lr_find_command(args: list[str]) -> None:
    from transfer_cli.config.compose import compose
    from transfer_cli.outputs import command_dir

    run_dir, args = take_run_dir(args)
    options, overrides = split_options(args)
    cfg = compose(overrides)  # checks the overrides first, with did-you-mean
    chosen = options.output or run_dir
    result = find_lr(cfg, command_dir(chosen, "lr_find"), options)
    print(f"loss vs learning rate: {result.plot}")
    if result.override is None:
        print("no suggestion: too few finite losses (more data, or a larger num_training / max_lr range)")
        return
    print(f"suggested learning rate: {result.suggestion:.3g}")
    print(f"use it with: transfer train {' '.join(overrides + [result.override])}".rstrip())
