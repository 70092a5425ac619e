"""The calibration part of `transfer eval` and `transfer predict`: a checkpoint's stored temperature and
decision threshold (assembly/calibration.py fitted them on the run's val split) applied to new logits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("transfer_cli")


def stored_calibration(restored: Any, use: bool = True) -> Optional[dict]:
    """The checkpoint's calibration block, or None: not asked for (`calibrated=false`), multilabel, or a
    checkpoint of a run that fitted none (no val split, an older version, calibration switched off)."""
    if not use or restored.task == "multilabel":
        return None
    block = restored.meta.get("calibration")
    return dict(block) if isinstance(block, dict) else None


def describe(block: Optional[dict]) -> str:
    """One line on what the probabilities and decisions are."""
    if block is None:
        return "uncalibrated: softmax of the logits (T = 1), the most probable class wins"
    line = f"temperature {block['temperature']:.4f} (fitted on {block['images']} val images)"
    if block.get("threshold") is not None:
        line += (f"; {block['positive_class']} when its probability >= {block['threshold']:.4f} "
                 f"({_criterion(block)} on val)")
    return line


def _criterion(block: dict) -> str:
    if block["criterion"] == "recall":
        return f"recall >= {block['target_recall']:g}"
    return str(block["criterion"])


def decision_rule(block: Optional[dict]) -> Optional[tuple[int, float]]:
    """(positive class index, threshold) when the block holds a binary threshold."""
    if block is None or block.get("threshold") is None:
        return None
    return int(block["positive_index"]), float(block["threshold"])


def calibration_section(block: Optional[dict], logits: Any, targets: Any, bins: int, out_dir: Path,
                        title: str) -> dict:
    """ECE and NLL of the evaluated images before and after the stored temperature, reliability.png, and at
    the stored threshold the binary scores; for eval_report.json's `calibration`."""
    from transfer_cli.plots import RELIABILITY_NAME, write_reliability
    from transfer_cli.training.calibration import (
        binary_scores, calibrated_probabilities, ece, nll, reliability_bins,
    )

    before = logits.float().softmax(-1)
    section: dict[str, Any] = {"stored": block is not None, "bins": int(bins), "nll_before": nll(logits, targets),
                               "ece_before": ece(before, targets, bins)}
    curves = [("T = 1 (as trained)", reliability_bins(before, targets, bins))]
    if block is not None:
        t = float(block["temperature"])
        after = calibrated_probabilities(logits, block)
        section.update(temperature=t, nll_after=nll(logits, targets, t), ece_after=ece(after, targets, bins))
        curves.append((f"T = {t:.3f} (fitted on val)", reliability_bins(after, targets, bins)))
        rule = decision_rule(block)
        if rule is not None:
            positive, threshold = rule
            section["at_threshold"] = {"positive_class": block["positive_class"], "threshold": threshold,
                                       "criterion": _criterion(block),
                                       **binary_scores(after[:, positive], targets == positive, threshold)}
    section["reliability_png"] = str(write_reliability(curves, out_dir / RELIABILITY_NAME, f"reliability: {title}"))
    return section


__all__ = ["stored_calibration", "describe", "decision_rule", "calibration_section"]
