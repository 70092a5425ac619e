"""The `transfer` command: parse the subcommand and hand over. No torch import happens here."""

from __future__ import annotations

import sys
from typing import Callable

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


def _train(args: list[str]) -> None:
    from transfer_cli.config.compose import check_overrides, own_data_defaults
    from transfer_cli.hydra_app import run_train_app

    args = own_data_defaults(args)  # your data, no experiment: the defaults of the transfer mode, not the demo's
    check_overrides(args)
    run_train_app(args)


def _augment_preview(args: list[str]) -> None:
    from transfer_cli.commands.augment_preview import augment_preview  # imports torch only once the config has composed

    print(f"wrote {augment_preview(args)}")


def _lr_find(args: list[str]) -> None:
    from transfer_cli.commands.lr_find import lr_find_command  # torch loads only once the command runs

    lr_find_command(args)


def _eval(args: list[str]) -> None:
    from transfer_cli.commands.evaluate import eval_command  # torch loads only once the arguments are valid

    eval_command(args)


def _predict(args: list[str]) -> None:
    from transfer_cli.commands.predict import predict_command

    predict_command(args)


def _export(args: list[str]) -> None:
    from transfer_cli.commands.export import export_command

    export_command(args)


def _data_report(args: list[str]) -> None:
    from transfer_cli.commands.data_report import data_report_command  # no torch: paths, headers, hashes

    data_report_command(args)


def _explain(args: list[str]) -> None:
    from transfer_cli.commands.explain import explain_command

    explain_command(args)


def _soup(args: list[str]) -> None:
    from transfer_cli.commands.soup import soup_command

    soup_command(args)


def _push(args: list[str]) -> None:
    from transfer_cli.commands.hub import push_command

    push_command(args)


def _tune(args: list[str]) -> None:
    from transfer_cli.sweeps.tune import tune_command  # Optuna loads once the arguments are valid

    tune_command(args)


def _screen(args: list[str]) -> None:
    from transfer_cli.commands.screen import screen_command  # torch loads only once the arguments are valid

    screen_command(args)


def _kfold(args: list[str]) -> None:
    from transfer_cli.commands.kfold import kfold_command  # torch loads only once the arguments are valid

    kfold_command(args)


def _sweep_summary(args: list[str]) -> None:
    from transfer_cli.sweeps.summary import build_summary  # no torch: records, CSV, matplotlib

    if len(args) != 1 or "=" in args[0]:
        raise TransferError("sweep-summary takes one argument: the sweep dir",
                            "transfer sweep-summary multirun/<name>/<date_time>")
    summary = build_summary(args[0])
    print("wrote " + ", ".join(str(p) for p in summary.files))


COMMANDS: dict[str, tuple[str, Callable[[list[str]], None]]] = {
    "train": ("train a classifier from the composed config (Hydra overrides: key=value, -m for sweeps)", _train),
    "augment-preview": ("PNG grid of augmented training samples [overrides] [n=16] [output=FILE.png]",
                        _augment_preview),
    "lr-find": ("LR range test on the configured run: lr_find.png and the optimizer.lr to use [overrides] "
                "[output=DIR] [min_lr=1e-7] [max_lr=1] [num_training=100]", _lr_find),
    "data-report": ("what the data holds: images per class and split, imbalance, sizes and modes, unreadable and "
                    "duplicate files; data_report.json, class_distribution.png [data overrides] [output=DIR]",
                    _data_report),
    "tune": ("an Optuna study (search space: hparams_search=optuna, or 'key=interval(a,b)' ranges), pruned per epoch, "
             "continued when run again [overrides] [tune.n_trials=20]", _tune),
    "kfold": ("k-fold cross-validation: k runs, each holding out one fold, in <output>/fold_<i>; mean ± std of "
              "the folds in kfold.json, the k models as an ensemble (ensemble.json); run again to continue "
              "[k=5] [output=DIR] [transfer train overrides]", _kfold),
    "sweep-summary": ("rebuild sweep_summary.{csv,md,png} of a sweep dir (also an interrupted sweep) <sweep dir>",
                      _sweep_summary),
    "screen": ("rank backbones and preprocessing by a converged linear probe on cached features "
               "model.backbone=a,b,c [data overrides] [crop_pct=own,1.0] [image_size=own,...] "
               "[interpolation=own,...] [output=DIR]", _screen),
    "eval": ("score a checkpoint: accuracy, per-class precision/recall/F1, confusion_matrix.png, eval_report.json, "
             "misclassified.csv, top_losses.png ckpt=<run dir|.ckpt|[a,b,...]> [split=test|val|train|all] [output=DIR] "
             "[top_losses=16] [cam=0] [data.*=...] [eval.tta=...]", _eval),
    "explain": ("Grad-CAM overlays: where the network looks ckpt=<run dir|.ckpt> input=<image|dir|csv> [output=DIR] "
                "[target=<class>] [layer=<module>]", _explain),
    "predict": ("predict images with a checkpoint or an exported ONNX file: one CSV row per image "
                "ckpt=<run dir|.ckpt|[a,b,...]|model.onnx|export dir> "
                "input=<image|dir|csv> [output=predictions.csv] [topk=3]", _predict),
    "export": ("export a checkpoint with its preprocessing and class names, checked against PyTorch "
               "ckpt=<run dir|.ckpt|[a,b,...]> format=onnx|torchscript|timm [output=FILE] [rtol=...] [atol=...]", _export),
    "soup": ("average the weights of runs from one start into one checkpoint, uniformly or greedily on val "
             "ckpt=[a,b,...] [method=uniform|greedy] [output=DIR]", _soup),
    "push": ("export format=timm and upload it to the Hugging Face Hub ckpt=<run dir|.ckpt> repo=<user>/<name> "
             "[private=false] [license=...]", _push),
}


def _help() -> str:
    from transfer_cli.config.folders import config_groups

    lines = [f"transfer {__version__}: transfer learning of image classifiers with timm, Lightning and Hydra.", ""]
    lines.append("usage: transfer <command> [overrides...]")
    lines.append("")
    lines.append("commands:")
    width = max(len(name) for name in COMMANDS) + 2
    lines += [f"  {name:<{width}}{text}" for name, (text, _) in COMMANDS.items()]
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
        COMMANDS[command][1](rest)
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
