"""`transfer screen model.backbone=a,b,c data=imagefolder data.root=... [crop_pct=own,1.0] [image_size=own]
[interpolation=own] [output=DIR]`: the cheap first step of a project.

Each candidate backbone, under each preprocessing variant, runs once over the training and validation images (as
a frozen feature extractor, eval transform); a converged linear probe (training/probe.py) on those features gives
its validation accuracy, and the candidates are ranked by it. Linear-probe accuracy of ImageNet backbones tracks
their fine-tuned accuracy (Kornblith et al., CVPR 2019), so the ranking says where fine-tuning should start. The
features go to the feature store (transfer.cache_dir), so a second screen of the same candidates, or the
`transfer train` of the winner, skips the backbones. The test split is never read: it stays for the headline.

Writes screen.csv and screen.png to `output` (default outputs/screen/<date>_<time>) and prints the table and the
`transfer train` command of the best candidate.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from transfer_cli.config.args import ANY_OVERRIDE, Option, parse_command_args
from transfer_cli.errors import TransferError

log = logging.getLogger("transfer_cli")

OWN = "own"  # a variant value meaning: the backbone's pretrained preprocessing (timm's data config)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
CSV_NAME, PNG_NAME = "screen.csv", "screen.png"
# A frozen backbone over fixed inputs: the features a linear probe (and `transfer train`'s cache) uses.
FIXED = ("transfer=feature_extract", "augmentation=none")


def _values(parse: Callable[[str], Any], allowed: tuple = ()) -> Callable[[str], tuple]:
    def parse_list(text: str) -> tuple:
        out = []
        for item in text.split(","):
            item = item.strip()
            if item != OWN:
                item = parse(item)
                if allowed and item not in allowed:
                    raise ValueError(item)
            out.append(item)
        if not out or len(set(out)) != len(out):
            raise ValueError(text)
        return tuple(out)

    return parse_list


def _crop(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError(text)
    return value


def _size(text: str) -> int:
    value = int(text)
    if value < 8:
        raise ValueError(text)
    return value


OPTIONS = {
    "crop_pct": Option(_values(_crop), (OWN, 1.0), help=f"a list of crop fractions in (0, 1] or '{OWN}'",
                       example="own,1.0"),
    "image_size": Option(_values(_size), (OWN,), help=f"a list of input sizes in pixels or '{OWN}'",
                         example="own,288"),
    "interpolation": Option(_values(str, INTERPOLATIONS), (OWN,),
                            help=f"a list of {', '.join(INTERPOLATIONS)} or '{OWN}'", example="own,bilinear"),
    "output": Option(str, None, help="the folder for screen.csv and screen.png", example="screen_out"),
}


@dataclass
class ScreenRow:
    """One candidate: a backbone under one preprocessing, and what its probe scored."""

    backbone: str
    crop_pct: float  # as used (the backbone's own when not asked otherwise)
    image_size: int
    interpolation: str
    val_score: float  # accuracy, or mAP for task=multilabel (`metric`)
    val_loss: float  # at the chosen strength: breaks ties in the score
    metric: str
    strength: float  # the probe's L2 strength, chosen on val
    feature_seconds: float  # computing (or, when `cached`, reading) the features of train and val
    images_per_s: Optional[float]  # backbone throughput of this pass; None when the features came from the cache
    params_m: float  # backbone parameters, millions
    cached: bool
    overrides: tuple  # what `transfer train` needs on top of the screen's own overrides

    @property
    def label(self) -> str:
        return f"{self.backbone} {self.image_size}px crop {self.crop_pct:g} {self.interpolation}"


def candidates(overrides: list[str]) -> tuple[list[str], list[Optional[str]]]:
    """(the overrides without the backbone list, the backbones: model.backbone=a,b,c, or [None] for the config's)."""
    from transfer_cli.config.overrides import override_key, parse

    rest, backbones = [], [None]
    for override in overrides:
        if override_key(override) != "model.backbone":
            rest.append(override)
            continue
        (parsed,) = parse([override])
        backbones = list(parsed.sweep_string_iterator()) if parsed.is_sweep_override() else [str(parsed.value())]
    return rest, backbones


def _variant_overrides(crop: Any, size: Any, interpolation: Any) -> tuple:
    return tuple(f"data.{key}={value}" for key, value in
                 (("crop_pct", crop), ("image_size", size), ("interpolation", interpolation)) if value != OWN)


def screen(overrides: list[str], crop_pcts: tuple, image_sizes: tuple, interpolations: tuple,
           out_dir: Path) -> list[ScreenRow]:
    """Every candidate backbone x variant, probed; rows best first. Writes screen.csv and screen.png."""
    import pytorch_lightning as pl
    import torch

    from transfer_cli.assembly.data import discover, feature_pass, image_data
    from transfer_cli.assembly.model import build_model
    from transfer_cli.assembly.probe import probe_settings
    from transfer_cli.config.compose import compose, own_data_defaults
    from transfer_cli.config.resolve import resolve_run
    from transfer_cli.inference import autocast_for, pick_device
    from transfer_cli.training.probe_head import fit_probe_on_splits

    rest, backbones = candidates(overrides)
    base = own_data_defaults(rest)  # composed as `transfer train` composes the printed command: the same split
    rows: list[ScreenRow] = []
    splits = None
    for backbone in backbones:
        seen: set = set()
        for crop, size, interpolation in itertools.product(crop_pcts, image_sizes, interpolations):
            variant = _variant_overrides(crop, size, interpolation)
            named = ((f"model.backbone={backbone}",) if backbone is not None else ()) + variant
            cfg = resolve_run(compose([*base, *FIXED, *named]))
            if splits is None:
                splits = discover(cfg.data, cfg.task)
                log.info("data: %s", splits.source_desc)
            # Seeded as build_run seeds: a random init (and so its features' cache key) repeats, and is train's.
            pl.seed_everything(cfg.seed, workers=True, verbose=False)
            model, data_config = build_model(cfg, len(splits.class_names))
            used = (float(data_config["crop_pct"]), int(data_config["input_size"][-1]),
                    str(data_config["interpolation"]))
            if used in seen:  # e.g. crop_pct=1.0 where the backbone's own crop is 1.0 already
                continue
            seen.add(used)
            device = pick_device(cfg.trainer.accelerator)
            images = image_data(cfg, splits, data_config, bad_log=out_dir / "bad_images.txt", device=device)
            started = time.perf_counter()
            features = feature_pass(cfg, images, model, device, autocast_for(device, cfg.trainer.precision),
                                    views=0).run(("train", "val"))
            seconds = time.perf_counter() - started
            probe = fit_probe_on_splits(features.tensors, **probe_settings(cfg, splits), device=device)
            computed = sum(len(t.tensors[1]) for t in features.tensors.values())
            rows.append(ScreenRow(
                backbone=cfg.model.backbone, crop_pct=used[0], image_size=used[1], interpolation=used[2],
                val_score=float(probe.val_scores[probe.index]), val_loss=float(probe.val_losses[probe.index]),
                metric=probe.metric, strength=probe.strength,
                feature_seconds=seconds, images_per_s=None if features.misses == 0 else computed / seconds,
                params_m=sum(p.numel() for p in model.backbone.parameters()) / 1e6, cached=features.misses == 0,
                overrides=named))
            r = rows[-1]
            print(f"screen: {r.label}: val {r.metric} {r.val_score:.4f}; features "
                  + ("read from the cache" if r.cached else f"computed in {r.feature_seconds:.0f} s"), flush=True)
            del model, images, features
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rows.sort(key=lambda r: (-r.val_score, r.val_loss))
    write_csv(rows, out_dir / CSV_NAME)
    try:  # a plot never fails the screen
        from transfer_cli.plots import write_screen_plot

        write_screen_plot(rows, out_dir / PNG_NAME)
    except Exception as e:  # noqa: BLE001
        log.warning("could not write %s: %s: %s", PNG_NAME, type(e).__name__, e)
    return rows


def write_csv(rows: list[ScreenRow], path: Path) -> Path:
    from transfer_cli.atomic import atomic_write_text

    out = io.StringIO()
    fields = [k for k in asdict(rows[0]) if k != "overrides"] if rows else []
    writer = csv.DictWriter(out, fieldnames=["rank", *fields], lineterminator="\n")
    writer.writeheader()
    for rank, row in enumerate(rows, 1):
        record = {k: v for k, v in asdict(row).items() if k != "overrides"}
        writer.writerow({"rank": rank, **record})
    return atomic_write_text(path, out.getvalue())


def command_to_train(rest: list[str], best: ScreenRow) -> str:
    """The `transfer train` of the best candidate: the screen's overrides with its backbone and preprocessing."""
    import shlex

    return " ".join(["transfer train", *(shlex.quote(o) for o in [*rest, *best.overrides])])


def print_table(rows: list[ScreenRow]) -> None:
    from rich.console import Console
    from rich.table import Table

    metric = rows[0].metric if rows else "accuracy"
    table = Table(title=f"transfer screen: linear-probe val {metric}, best first", title_justify="left")
    for column in ("#", "backbone", "size", "crop", "interp", f"val {metric[:3]}", "val loss", "L2", "feat s",
                   "img/s", "params M"):
        left = column in ("backbone", "interp")
        table.add_column(column, justify="left" if left else "right", no_wrap=left)
    for rank, r in enumerate(rows, 1):
        table.add_row(str(rank), r.backbone, str(r.image_size), f"{r.crop_pct:g}", r.interpolation,
                      f"{r.val_score:.4f}", f"{r.val_loss:.3f}", f"{r.strength:.2g}", f"{r.feature_seconds:.1f}",
                      "cached" if r.images_per_s is None else f"{r.images_per_s:.0f}", f"{r.params_m:.1f}")
    Console(width=None if sys.stdout.isatty() else 132).print(table)  # a log file gets the whole table


def screen_command(args: list[str]) -> None:
    from transfer_cli.config.compose import as_schema, compose, own_data_defaults
    from transfer_cli.outputs import command_dir

    values, overrides = parse_command_args("screen", args, OPTIONS, ANY_OVERRIDE)
    rest, backbones = candidates(overrides)
    for backbone in backbones:  # every candidate's config checked before torch loads and any backbone runs
        named = (f"model.backbone={backbone}",) if backbone is not None else ()
        as_schema(compose([*own_data_defaults(rest), *FIXED, *named]))
    out_dir = command_dir(values["output"], "screen")  # refused before any work: a file, a run's dir
    rows = screen(overrides, values["crop_pct"], values["image_size"], values["interpolation"], out_dir)
    if not rows:
        raise TransferError("no candidate was screened", "name backbones: model.backbone=resnet50,convnext_tiny")
    print_table(rows)
    print(f"wrote {out_dir / CSV_NAME} and {out_dir / PNG_NAME}")
    print(f"best: {rows[0].label}, val {rows[0].metric} {rows[0].val_score:.4f}; train it with:")
    print(f"  {command_to_train(rest, rows[0])}")


__all__ = ["screen", "screen_command", "ScreenRow", "candidates", "command_to_train", "OPTIONS"]
