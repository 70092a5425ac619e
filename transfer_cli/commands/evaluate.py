"""`transfer eval ckpt=<run dir|.ckpt|[a,b]|ensemble folder> [split=test|val|train|all] [output=DIR] [data.*=...]`.

Scores a trained checkpoint on labelled images: the run's own test split (else val) by default, or any data the
overrides point at (data.root=..., data=csv data.csv=...). Writes eval_report.json and confusion_matrix.png and
prints the metrics. The network, classes and preprocessing come from the checkpoint; the metric definitions
are the trainer's (training/metrics.py), so `acc` here is the number the trainer logged for the same images.
An ensemble (commands/ensemble.py) is scored on its members' mean probabilities, each member also on its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from transfer_cli.atomic import atomic_write_json
from transfer_cli.config.args import CHECKPOINTS, COUNT, Option, parse_command_args
from transfer_cli.errors import TransferError
from transfer_cli.outputs import output_dir

if TYPE_CHECKING:  # the name only: restore.py brings OmegaConf and the model code, loaded when a command runs
    from transfer_cli.commands.restore import Restored

log = logging.getLogger("transfer_cli")

REPORT_NAME = "eval_report.json"
SPLIT_CHOICES = ("test", "val", "train", "all")
OPTIONS = {
    "ckpt": Option(CHECKPOINTS, required=True, help="a run dir, a .ckpt file, [a,b,...] (an ensemble) or a folder with "
                   "ensemble.json", example="outputs/<name>/<date>_<time>"),
    "split": Option(str, None, help="the split to score (default: test if the data has one, else val)",
                    choices=SPLIT_CHOICES),
    "output": Option(str, None, help="folder for the report (default: <run dir>/eval)", example="eval_out"),
    "top_losses": Option(COUNT, 16, help="a number (0: none) of highest-loss images in top_losses.png"),
    "cam": Option(COUNT, 0, help="a number of highest-loss images shown with Grad-CAM (needs grad-cam)"),
}
# What may change between training and evaluation: the data, TTA, the threshold and where it runs.
OVERRIDES = ("data", "data.", "eval.", "multilabel_threshold", "trainer.accelerator", "trainer.precision",
             "trainer.channels_last", "calibration.bins")


def _remap(splits: Any, class_names: Sequence[str]) -> Any:
    """The samples' class indices in the checkpoint's order; data may hold fewer classes, never unknown ones."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [c for c in splits.class_names if c not in index]
    if unknown:
        raise TransferError(f"the data has classes the checkpoint was not trained on: {', '.join(unknown)}",
                            f"the checkpoint knows: {', '.join(class_names)}; point data.* at images of those")
    to_ckpt = [index[c] for c in splits.class_names]

    def convert(samples: list) -> list:
        if splits.multilabel:
            return [(p, tuple(to_ckpt[i] for i in labels)) for p, labels in samples]
        return [(p, to_ckpt[label]) for p, label in samples]

    return replace(splits, class_names=list(class_names), train=convert(splits.train), val=convert(splits.val),
                   test=convert(splits.test))


def _choose_split(splits: Any, split: str | None) -> tuple[Any, str]:
    """(splits, the split name the loader reads); "all" gathers every image into the test slot."""
    if split is None:
        return splits, "test" if splits.test else "val"
    if split == "all":
        return replace(splits, test=splits.train + splits.val + splits.test), "test"
    if split == "test" and not splits.test:
        raise TransferError(f"the data ({splits.source_desc}) has no test split",
                            "evaluate another split: split=val (or split=all)")
    return splits, split


def collect_logits(restored: Restored, images: Any, split: str) -> tuple[Any, Any]:
    """(logits, targets) of every readable image of `split`, with the run's precision, layout and eval.tta."""
    from transfer_cli.inference import autocast_for, infer, pick_device, place_model
    from transfer_cli.training.tta import tta_forward

    cfg = restored.cfg
    device = pick_device(cfg.trainer.accelerator)
    channels_last = bool(cfg.trainer.channels_last)
    model = place_model(restored.model, device, channels_last)
    logits, targets = infer(tta_forward(model, cfg.eval.tta, cfg.eval.multicrop_fraction),
                            images.loader(split, augment=False), device=device,
                            autocast=autocast_for(device, cfg.trainer.precision), channels_last=channels_last,
                            prepare=lambda batch: images.strip_bad(batch, device))
    if not len(targets):
        raise TransferError(f"no readable image in the {split} split", "check the data: bad_images.txt lists them")
    return logits, targets


def _multiclass_metrics(cfg: Any, logits: Any, targets: Any, names: list[str]) -> tuple[dict, list[dict], list]:
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    from transfer_cli.training.metrics import stage_metrics

    n = len(names)
    metrics = {k.split("/", 1)[1]: float(v) for k, v in stage_metrics("multiclass", n, "test")(logits, targets).items()}
    if n >= 5:
        metrics["top5_acc"] = float(MulticlassAccuracy(num_classes=n, top_k=5, average="micro")(logits, targets))
    metrics["balanced_acc"] = float(MulticlassAccuracy(num_classes=n, average="macro")(logits, targets))
    metrics["macro_f1"] = float(MulticlassF1Score(num_classes=n, average="macro")(logits, targets))
    per = {name: metric(num_classes=n, average=None)(logits, targets).tolist()
           for name, metric in (("precision", MulticlassPrecision), ("recall", MulticlassRecall),
                                ("f1", MulticlassF1Score))}
    support = targets.bincount(minlength=n).tolist()
    per_class = [{"class": c, "precision": per["precision"][i], "recall": per["recall"][i], "f1": per["f1"][i],
                  "support": int(support[i])} for i, c in enumerate(names)]
    matrix = MulticlassConfusionMatrix(num_classes=n)(logits, targets).tolist()
    return metrics, per_class, matrix


def _multilabel_metrics(cfg: Any, logits: Any, targets: Any, names: list[str]) -> tuple[dict, list[dict], list]:
    from torchmetrics.classification import (
        MultilabelAveragePrecision,
        MultilabelConfusionMatrix,
        MultilabelF1Score,
        MultilabelPrecision,
        MultilabelRecall,
    )

    from transfer_cli.training.metrics import check_threshold, stage_metrics

    n, threshold = len(names), check_threshold(cfg.multilabel_threshold)
    metrics = {k.split("/", 1)[1]: float(v)
               for k, v in stage_metrics("multilabel", n, "test", threshold)(logits, targets).items()}
    probs, hard = logits.sigmoid(), (targets >= 0.5).long()
    kwargs = {"num_labels": n, "threshold": threshold, "average": None}
    per = {"precision": MultilabelPrecision(**kwargs)(probs, hard).tolist(),
           "recall": MultilabelRecall(**kwargs)(probs, hard).tolist(),
           "f1": MultilabelF1Score(**kwargs, zero_division=1.0)(probs, hard).tolist(),
           "ap": MultilabelAveragePrecision(num_labels=n, average=None)(probs, hard).tolist()}
    support = hard.sum(0).tolist()
    per_class = [{"class": c, "precision": per["precision"][i], "recall": per["recall"][i], "f1": per["f1"][i],
                  # AP is undefined without a positive; null rather than torchmetrics' 0
                  "ap": per["ap"][i] if support[i] > 0 else None, "support": int(support[i])}
                 for i, c in enumerate(names)]
    matrices = MultilabelConfusionMatrix(num_labels=n, threshold=threshold)(probs, hard).tolist()
    return metrics, per_class, matrices


def _readable_paths(images: Any, split: str, count: int) -> list[str]:
    """The paths of the images the loader delivered, in its order (unreadable ones dropped)."""
    bad = {path for path, _ in images.bad_images}
    paths = [path for path, _ in images.samples(split) if path not in bad]
    if len(paths) != count:  # cannot happen unless the loader reorders: then no row may name the wrong file
        raise RuntimeError(f"{count} outputs for {len(paths)} readable images of the {split} split")
    return paths


def _mistakes(restored: Restored, logits: Any, targets: Any, matrix: Any, paths: list[str], out_dir: Path,
              top_losses: int, cam: int, title: str) -> dict:
    """misclassified.csv, top_losses.png, Grad-CAM of the worst (cam=k), and the most confused classes."""
    from transfer_cli.commands.mistakes import (
        CAM_NAME, MISCLASSIFIED_NAME, TOP_LOSSES_NAME, write_cam_grid, write_misclassified, write_top_losses,
    )
    from transfer_cli.training.mistakes import label_errors, most_confused, rank_outcomes

    names, multilabel = restored.class_names, restored.task == "multilabel"
    outcomes = rank_outcomes(logits, targets, names, restored.task, restored.threshold)
    out: dict[str, Any] = {"misclassified": write_misclassified(outcomes, paths, out_dir / MISCLASSIFIED_NAME),
                           "misclassified_csv": str(out_dir / MISCLASSIFIED_NAME)}
    # multiclass: (true, predicted) pairs by count; multilabel: the labels most often missed or added
    out["most_confused"] = label_errors(matrix, names) if multilabel else most_confused(matrix, names)
    for name in (TOP_LOSSES_NAME, CAM_NAME):
        (out_dir / name).unlink(missing_ok=True)  # this evaluation's pictures, not an earlier one's
    if top_losses:
        out["top_losses_png"] = str(write_top_losses(outcomes[:top_losses], paths, restored.data_config,
                                                     out_dir / TOP_LOSSES_NAME, f"highest losses: {title}"))
    if cam:
        from transfer_cli.inference import pick_device

        out["gradcam_png"] = str(write_cam_grid(restored.model, outcomes[:cam], paths, names, restored.data_config,
                                                pick_device(restored.cfg.trainer.accelerator), out_dir / CAM_NAME,
                                                f"Grad-CAM of the highest losses: {title}"))
    return out


def _member_logits(restored: Restored, split: str | None, bad_log: Path | None) -> tuple[Any, Any, Any, Any, str]:
    """(logits, targets, image data, splits, the split the loader reads) of one checkpoint on its data config."""
    from transfer_cli.assembly.data import discover, image_data
    from transfer_cli.inference import pick_device

    cfg = restored.cfg
    splits = _remap(discover(cfg.data, restored.task), restored.class_names)
    splits, split_name = _choose_split(splits, split)
    images = image_data(cfg, splits, restored.data_config, bad_log=bad_log, device=pick_device(cfg.trainer.accelerator))
    logits, targets = collect_logits(restored, images, split_name)
    return logits, targets, images, splits, split_name


def _same_images(ensemble: Any, scored: list[tuple], split: str) -> None:
    """Every member scored the same images with the same labels: members whose data configs split differently
    (k-fold runs, whose val folds differ) are not averaged over their own, different splits."""
    _, targets, images, _, split_name = scored[0]
    samples = images.samples(split_name)
    for ref, (_, other_targets, other_images, _, _) in zip(ensemble.spec.refs[1:], scored[1:]):
        if other_images.samples(split_name) != samples or not other_targets.equal(targets):
            raise TransferError(
                f"the ensemble's members hold different {split} splits ({ensemble.spec.refs[0]} vs {ref}: their data "
                "configs split the images differently, e.g. k-fold runs), so no image set is held out from all",
                "evaluate a split they share (split=test), or point every member at the same held-out images: "
                "data.root=<folder>")


def evaluate(ckpt: Any, overrides: Sequence[str] = (), split: str | None = None,
             output: str | Path | None = None, top_losses: int = 16, cam: int = 0) -> dict:
    """Score the checkpoint (or the ensemble: commands/ensemble.py); returns the report (also written to
    <output>/eval_report.json)."""
    from transfer_cli.commands.members import members_of, single
    from transfer_cli.plots import CONFUSION_NAME, write_confusion_matrix, write_label_matrices

    started = time.time()
    members = members_of(ckpt)
    if members is not None and cam:
        raise TransferError("cam= shows where one network looks; an ensemble averages several",
                            "cam=0, or explain a member: transfer eval ckpt=<member run dir> cam=8")
    chosen_dir = output_dir(output) if output else None  # refused before any work
    if cam:  # before the checkpoint loads: a missing package should not cost a whole evaluation
        from transfer_cli.models.gradcam import require_gradcam

        require_gradcam()
    if members is None:
        from transfer_cli.commands.restore import restore

        restored: Any = restore(single(ckpt), overrides)
        each = [restored]
        out_dir = chosen_dir or restored.run_dir / "eval"
    else:
        from transfer_cli.commands.ensemble import restore_ensemble
        from transfer_cli.outputs import command_dir

        restored = restore_ensemble(members, overrides)
        each = restored.members
        out_dir = chosen_dir or (members.folder / "eval" if members.folder else command_dir(None, "eval"))
    cfg, names = restored.cfg, restored.class_names
    out_dir.mkdir(parents=True, exist_ok=True)
    bad_log = out_dir / "bad_images.txt"
    bad_log.unlink(missing_ok=True)  # this evaluation's list, not an earlier one's
    scored = [_member_logits(m, split, bad_log if i == 0 else None) for i, m in enumerate(each)]
    logits, targets, images, splits, split_name = scored[0]
    multilabel = restored.task == "multilabel"
    metric_fn = _multilabel_metrics if multilabel else _multiclass_metrics
    ensemble_block = None
    if members is not None:
        _same_images(restored, scored, split or split_name)
        logits = restored.logits([s[0] for s in scored])
        ensemble_block = {"source": members.source, "how": restored.describe(),
                          "members": [{**restored.member_record(i), "tta": str(m.cfg.eval.tta),
                                       "metrics": metric_fn(m.cfg, scored[i][0], targets, names)[0]}
                                      for i, m in enumerate(each)]}
        log.info("%s", restored.describe())
    metrics, per_class, matrix = metric_fn(cfg, logits, targets, names)

    what = Path(restored.checkpoint).name if members is None else f"ensemble of {len(each)}"
    title = f"{what} on {split or split_name} ({len(targets)} images)"
    png = out_dir / CONFUSION_NAME
    if multilabel:
        write_label_matrices(matrix, names, png, title)
    else:
        write_confusion_matrix(matrix, names, png, title)
    report = {
        "checkpoint": str(restored.checkpoint),
        "run_dir": None if restored.run_dir is None else str(restored.run_dir),
        "data": splits.source_desc,
        "split": split or split_name,
        "num_images": int(len(targets)),
        # the evaluated split's own: the data module scans (and records) every split's files at setup
        "bad_images": [list(b) for b in images.bad_images if b[0] in {p for p, _ in getattr(splits, split_name)}],
        "task": restored.task,
        "tta": str(cfg.eval.tta),
        "class_names": names,
        "metrics": metrics,
        **({"ensemble": ensemble_block} if ensemble_block else {}),
        "per_class": per_class,
        # multiclass: rows = true class, columns = predicted; multilabel: per label [[TN, FP], [FN, TP]]
        "confusion_matrix": matrix,
        "confusion_matrix_png": str(png),
        **_mistakes(restored, logits, targets, matrix, _readable_paths(images, split_name, len(targets)), out_dir,
                    top_losses, cam, title),
        "wall_time_s": round(time.time() - started, 1),
    }
    if multilabel:
        report["multilabel_threshold"] = restored.threshold
    else:  # ECE before/after the checkpoint's temperature, reliability.png, scores at its decision threshold
        from transfer_cli.commands.calibration_report import calibration_section, stored_calibration

        report["calibration"] = calibration_section(stored_calibration(restored), logits, targets,
                                                    cfg.calibration.bins, out_dir, title)
        if members is not None:  # the mean of calibrated members: nothing left to apply
            report["calibration"]["member_temperatures"] = restored.temperatures()
    report_path = atomic_write_json(out_dir / REPORT_NAME, report)
    report["report"] = str(report_path)
    return report


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = Table(title=f"transfer eval: {report['split']} split, {report['num_images']} images", show_header=False,
                 title_style="bold")
    head.add_column(style="bold")
    head.add_column(overflow="fold")
    for key, value in report["metrics"].items():
        head.add_row(key, f"{value:.4f}")
    head.add_row("tta", report["tta"])
    cal = report.get("calibration")
    if cal:
        after = f" -> {cal['ece_after']:.4f} at T = {cal['temperature']:.4f}" if cal["stored"] else \
            " (the mean of the members' probabilities, each at its own temperature)" \
            if "member_temperatures" in cal else " (the checkpoint holds no temperature)"
        head.add_row("ECE", f"{cal['ece_before']:.4f}{after}")
        at = cal.get("at_threshold")
        if at:
            head.add_row("at threshold", f"{at['positive_class']} when p >= {at['threshold']:.4f} ({at['criterion']}): "
                         f"recall {at['recall']:.4f}, precision {at['precision']:.4f}, balanced acc "
                         f"{at['balanced_accuracy']:.4f}, F1 {at['f1']:.4f}")
    if report["bad_images"]:
        head.add_row("unreadable", f"{len(report['bad_images'])} (skipped; listed in the report)")
    head.add_row("checkpoint", report["checkpoint"])
    console.print(head)
    if "ensemble" in report:
        members = Table(title=report["ensemble"]["how"], title_style="bold")
        keys = list(report["metrics"])
        for col in ["member", "weight", *keys]:
            members.add_column(col, justify="left" if col == "member" else "right", overflow="fold")
        for m in report["ensemble"]["members"]:
            members.add_row(m["checkpoint"], f"{m['weight']:.3f}",
                            *[f"{m['metrics'][k]:.4f}" if k in m["metrics"] else "-" for k in keys])
        console.print(members)
    per = Table(title="per class", title_style="bold")
    columns = ["class", "precision", "recall", "f1"] + (["ap"] if report["task"] == "multilabel" else []) + ["support"]
    for col in columns:
        per.add_column(col, justify="left" if col == "class" else "right")
    for row in report["per_class"]:
        per.add_row(*[str(row[c]) if c in ("class", "support") else
                      ("-" if row[c] is None else f"{row[c]:.3f}") for c in columns])
    console.print(per)
    confused = Table(title="most confused" if report["task"] != "multilabel" else "labels with the most errors",
                     title_style="bold")
    columns = ["true", "predicted", "count", "share_of_true"] if report["task"] != "multilabel" else \
        ["label", "missed", "spurious", "errors"]
    for col in columns:
        confused.add_column(col.replace("_", " "), justify="left" if col in ("true", "predicted", "label") else "right")
    for row in report["most_confused"]:
        confused.add_row(*[f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns])
    if report["most_confused"]:
        console.print(confused)
    files = [("report", "report"), ("confusion matrix", "confusion_matrix_png"),
             ("reliability", "reliability_png"),
             (f"misclassified ({report['misclassified']})", "misclassified_csv"), ("top losses", "top_losses_png"),
             ("Grad-CAM", "gradcam_png")]
    paths = {**report, "reliability_png": (cal or {}).get("reliability_png")}
    console.print("\n".join(f"{label}: {paths[key]}" for label, key in files if paths.get(key)), highlight=False)


def eval_command(args: list[str]) -> None:
    options, overrides = parse_command_args("eval", args, OPTIONS, OVERRIDES)
    report = evaluate(options["ckpt"], overrides, split=options["split"], output=options["output"],
                      top_losses=options["top_losses"], cam=options["cam"])
    print_report(report)


__all__ = ["evaluate", "eval_command", "collect_logits", "print_report", "OPTIONS", "OVERRIDES"]
