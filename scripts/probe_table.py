#!/usr/bin/env python
"""The frozen backbone's head, epochs vs the converged probe (issue 16's table), on scikit-learn's digits.

scikit-learn's 1,797 handwritten digits (8x8 grey images, 10 classes) become an ImageFolder of PNGs; the offline
ImageNet EfficientNet-Lite0 (`model=efficientnet_lite0_offline transfer=feature_extract`) runs once per
preprocessing variant (the feature store in --work-dir), val 20 % chooses and test 20 % reports (split_seed 0).
Rows: the epoch loop at the demo's AdamW settings (transfer.head_solver=sgd) for 8, 30 and 100 epochs; the
converged probe (lbfgs) with the backbone's preprocessing, with data.crop_pct=1.0 and with crop 1.0 + bilinear;
scikit-learn's LogisticRegressionCV on the same standardized features, its C chosen on the same val rows.

    python scripts/probe_table.py --work-dir /tmp/probe_table      # ~6 min on 2 CPU cores, cold
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import numpy as np


def make_digits(root: Path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    if root.is_dir():
        return root
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8), mode="L").save(root / str(label) / f"{i:04d}.png")
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="probe_table")
    args = p.parse_args()
    work = Path(args.work_dir).expanduser().resolve()
    root = make_digits(work / "digits")

    from transfer_cli.assembly.run import build_run
    from transfer_cli.config.compose import as_schema, compose
    from transfer_cli.train import train

    logging.getLogger("transfer_cli").setLevel(logging.WARNING)
    base = ["data=imagefolder", f"data.root={root}", "~experiment", "model=efficientnet_lite0_offline",
            "transfer=feature_extract", "augmentation=none", "data.val_fraction=0.2", "data.test_fraction=0.2",
            "data.batch_size=128", "optimizer.lr=1e-2", "optimizer.weight_decay=1e-4",
            f"transfer.cache_dir={work / 'features'}", "callbacks.rich_progress=false",
            "trainer.enable_progress_bar=false"]
    rows = []

    def run(name: str, *extra: str):
        cfg = compose([*base, *extra, f"paths.output_dir={work / 'runs' / name}"])
        start = time.perf_counter()
        summary = train(cfg)
        probe = summary.get("probe") or {}
        rows.append((name, " ".join(extra), summary["val_acc"], summary["test_acc"], summary["epochs"],
                     time.perf_counter() - start, probe.get("fit_seconds"), probe.get("strength")))
        print(rows[-1], flush=True)
        return cfg

    solved = run("lbfgs", "transfer.head_solver=lbfgs")
    for epochs in (8, 30, 100):
        run(f"sgd{epochs}", "transfer.head_solver=sgd", f"trainer.max_epochs={epochs}")
    run("lbfgs_crop1", "transfer.head_solver=lbfgs", "data.crop_pct=1.0")
    run("lbfgs_crop1_bilinear", "transfer.head_solver=lbfgs", "data.crop_pct=1.0", "data.interpolation=bilinear")

    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import PredefinedSplit
    from sklearn.preprocessing import StandardScaler

    (work / "runs" / "sklearn").mkdir(parents=True, exist_ok=True)
    parts = build_run(as_schema(solved), work / "runs" / "sklearn")
    parts.datamodule.setup("fit")  # the features of the lbfgs row, from the store
    features = {k: (v.tensors[0].numpy(), v.tensors[1].numpy()) for k, v in parts.features.tensors.items()}
    (xtr, ytr), (xva, yva), (xte, yte) = features["train"], features["val"], features["test"]
    scaler = StandardScaler().fit(xtr)
    folds = PredefinedSplit(np.r_[np.full(len(ytr), -1), np.zeros(len(yva), dtype=int)])
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegressionCV(cv=folds, refit=False, max_iter=1000, scoring="accuracy").fit(
            scaler.transform(np.r_[xtr, xva]), np.r_[ytr, yva])
    seconds = time.perf_counter() - start
    rows.append(("LogisticRegressionCV", "the lbfgs row's features, C on the same val rows",
                 float(model.score(scaler.transform(xva), yva)), float(model.score(scaler.transform(xte), yte)),
                 None, seconds, seconds, None))

    print("\n| run | overrides | val acc | test acc | epochs | train() wall s | head fit s | L2 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, extra, val, test, epochs, wall, fit, strength in rows:
        print(f"| {name} | {extra} | {val:.4f} | {test:.4f} | {'' if epochs is None else epochs} | {wall:.1f} | "
              f"{'' if fit is None else f'{fit:.2f}'} | {'' if strength is None else f'{strength:.3g}'} |")


if __name__ == "__main__":
    main()
