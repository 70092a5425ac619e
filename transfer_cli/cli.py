"""The `transfer` command: parse the subcommand and hand over. No torch import happens here."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from transfer_cli import __version__
from transfer_cli.errors import TransferError, print_error

EXAMPLES = """\
examples:
  transfer train                                    # the offline demo (experiment=demo)
  transfer train experiment=resnet50_feature_extract data=imagefolder data.root=~/data/flowers
  transfer train model.backbone=convnext_tiny transfer=fine_tune optimizer.lr=3e-4 \\
                 trainer=gpu trainer.precision=bf16-mixed
  transfer train debug=fast_dev_run                 # one batch through everything
  transfer screen model.backbone=resnet50,convnext_tiny data=imagefolder data.root=~/data/flowers
  transfer train -m optimizer.lr=1e-3,3e-4          # a Hydra multirun sweep, summarised in its sweep dir
  transfer kfold k=5 data=imagefolder data.root=~/data/flowers  # 5 folds, mean ± std, the 5 models an ensemble
  transfer tune tune.n_trials=20                    # an Optuna study with pruning (pip install 'transfer-cli[optuna]')
  transfer train --help                             # every config group and key
"""


@dataclass(frozen=True)
class Command:
    summary: str  # the line of `transfer --help`
    entry: str  # "module:function", the function taking the command's arguments; imported only when it runs,
    # so `transfer --help` and a mistyped command load none of them


COMMANDS: dict[str, Command] = {
    "train": Command("train a classifier from the composed config (Hydra overrides: key=value, -m for sweeps)",
                     "transfer_cli.commands.train:train_command"),
    "augment-preview": Command("PNG grid of augmented training samples [overrides] [n=16] [output=FILE.png]",
                               "transfer_cli.commands.augment_preview:augment_preview_command"),
    "lr-find": Command("LR range test on the configured run: lr_find.png and the optimizer.lr to use [overrides] "
                       "[output=DIR] [min_lr=1e-7] [max_lr=1] [num_training=100]",
                       "transfer_cli.commands.lr_find:lr_find_command"),
    "data-report": Command("what the data holds: images per class and split, imbalance, sizes and modes, unreadable "
                           "and duplicate files; data_report.json, class_distribution.png [data overrides] "
                           "[output=DIR]", "transfer_cli.commands.data_report:data_report_command"),
    # tune's command lives with its engine (ask-and-tell, pruning, workers) in sweeps/tune.py
    "tune": Command("an Optuna study (search space: hparams_search=optuna, or 'key=interval(a,b)' ranges), pruned per "
                    "epoch, continued when run again [overrides] [tune.n_trials=20]",
                    "transfer_cli.sweeps.tune:tune_command"),
    "kfold": Command("k-fold cross-validation: k runs, each holding out one fold, in <output>/fold_<i>; mean ± std "
                     "of the folds in kfold.json, the k models as an ensemble (ensemble.json); run again to continue "
                     "[k=5] [output=DIR] [transfer train overrides]", "transfer_cli.commands.kfold:kfold_command"),
    "sweep-summary": Command("rebuild sweep_summary.{csv,md,png} of a sweep dir (also an interrupted sweep) "
                             "<sweep dir>", "transfer_cli.commands.sweep_summary:sweep_summary_command"),
    "screen": Command("rank backbones and preprocessing by a converged linear probe on cached features "
                      "model.backbone=a,b,c [data overrides] [crop_pct=own,1.0] [image_size=own,...] "
                      "[interpolation=own,...] [output=DIR]", "transfer_cli.commands.screen:screen_command"),
    "eval": Command("score a checkpoint: accuracy, per-class precision/recall/F1, confusion_matrix.png, "
                    "eval_report.json, misclassified.csv, top_losses.png ckpt=<run dir|.ckpt|[a,b,...]> "
                    "[split=test|val|train|all] [output=DIR] [top_losses=16] [cam=0] [data.*=...] [eval.tta=...]",
                    "transfer_cli.commands.evaluate:eval_command"),
    "explain": Command("Grad-CAM overlays: where the network looks ckpt=<run dir|.ckpt> input=<image|dir|csv> "
                       "[output=DIR] [target=<class>] [layer=<module>]", "transfer_cli.commands.explain:explain_command"),
    "predict": Command("predict images with a checkpoint or an exported ONNX file: one CSV row per image "
                       "ckpt=<run dir|.ckpt|[a,b,...]|model.onnx|export dir> input=<image|dir|csv> "
                       "[output=predictions.csv] [topk=3]", "transfer_cli.commands.predict:predict_command"),
    "export": Command("export a checkpoint with its preprocessing and class names, checked against PyTorch "
                      "ckpt=<run dir|.ckpt|[a,b,...]> format=onnx|torchscript|timm [output=FILE] [rtol=...] "
                      "[atol=...]", "transfer_cli.commands.export:export_command"),
    "soup": Command("average the weights of runs from one start into one checkpoint, uniformly or greedily on val "
                    "ckpt=[a,b,...] [method=uniform|greedy] [output=DIR]", "transfer_cli.commands.soup:soup_command"),
    "push": Command("export format=timm and upload it to the Hugging Face Hub ckpt=<run dir|.ckpt> "
                    "repo=<user>/<name> [private=false] [license=...]", "transfer_cli.commands.hub:push_command"),
}


def _help() -> str:
    from transfer_cli.config.folders import config_groups

    lines = [f"transfer {__version__}: transfer learning of image classifiers with timm, Lightning and Hydra.", ""]
    lines.append("usage: transfer <command> [overrides...]")
    lines.append("")
    lines.append("commands:")
    width = max(len(name) for name in COMMANDS) + 2
    lines += [f"  {name:<{width}}{spec.summary}" for name, spec in COMMANDS.items()]
    lines.append("")
    lines.append("config groups (choose with group=option, e.g. transfer=fine_tune):")
    for group, options in config_groups().items():
        if group != "hydra":
            lines.append(f"  {group:<13} {', '.join(options)}")
    lines.append("")
    lines.append(EXAMPLES)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _main(argv)
    except BrokenPipeError:  # `transfer --help | head`: the reader left; nothing more to say, no traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush must not fail again
        sys.exit(1)


def _main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help())
        return
    if argv[0] in ("-V", "--version"):
        print(f"transfer {__version__}")
        return
    from transfer_cli.config.args import expand_home

    command, rest = argv[0], [expand_home(a) for a in argv[1:]]
    try:
        if command not in COMMANDS:
            from transfer_cli.errors import close_matches

            close = close_matches(command, COMMANDS, n=1)
            raise TransferError(
                f"unknown command '{command}'",
                f"did you mean `transfer {close[0]}`?" if close else f"commands: {', '.join(COMMANDS)}",
            )
        module, _, function = COMMANDS[command].entry.partition(":")
        getattr(importlib.import_module(module), function)(rest)
    except TransferError as err:
        print_error(err)
        sys.exit(2)
    except OSError as err:  # a full disk, a read-only folder: the user's to fix, not a bug
        from transfer_cli.errors import from_os_error

        user_error = from_os_error(err)
        if user_error is None:
            raise
        print_error(user_error)
        sys.exit(2)


if __name__ == "__main__":
    main()
