"""Several trained checkpoints as one classifier, for `transfer eval`, `predict` and `export` (`ckpt=[a,b]` or a
folder with ensemble.json, commands/members.py).

Each member is restored as a single checkpoint is (its own config, preprocessing and weights) and runs through the
one inference loop with its own image size and mean/std; its probabilities (at its own calibrated temperature) are
averaged with the ensemble's weights (models/ensemble.py). Members must agree on the class names, in order, and on
the task: a mean of probabilities over different classes means nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from transfer_cli.commands.members import Members
from transfer_cli.errors import TransferError

log = logging.getLogger("transfer_cli")

# The preprocessing that one exported graph (one input tensor) needs all its members to share.
SHARED_PREPROCESSING = ("input_size", "mean", "std", "interpolation", "crop_pct")


@dataclass
class Ensemble:
    """The restored members (commands/restore.py Restored) and their weights; reads like one Restored where eval and
    predict need it (class names, task, threshold, the first member's config and preprocessing for pictures)."""

    members: list[Any]
    weights: list[float]
    spec: Members

    @property
    def class_names(self) -> list[str]:
        return self.members[0].class_names

    @property
    def task(self) -> str:
        return self.members[0].task

    @property
    def threshold(self) -> float:
        return self.members[0].threshold

    @property
    def cfg(self) -> Any:
        return self.members[0].cfg

    @property
    def data_config(self) -> dict:
        return self.members[0].data_config

    @property
    def checkpoint(self) -> str:
        return self.spec.source

    @property
    def run_dir(self) -> Optional[Path]:
        return self.spec.folder

    @property
    def meta(self) -> dict:
        # No calibration of its own: each member's temperature applies before the mean (models/ensemble.py).
        return {"backbone": [m.meta.get("backbone") for m in self.members]}

    def temperatures(self, calibrated: bool = True) -> list[float]:
        """Each member's stored temperature (1 where it has none, for multilabel, or with calibrated=False)."""
        from transfer_cli.commands.calibration_report import stored_calibration

        blocks = [stored_calibration(m, calibrated) for m in self.members]
        return [float(b["temperature"]) if b else 1.0 for b in blocks]

    def logits(self, member_logits: Sequence[Any], calibrated: bool = True) -> Any:
        """The ensemble's outputs as logits (models/ensemble.py as_logits) from each member's logits."""
        from transfer_cli.models.ensemble import ensemble_logits

        return ensemble_logits(member_logits, self.task, self.temperatures(calibrated), self.weights)

    def describe(self, calibrated: bool = True) -> str:
        temps = ", ".join(f"{t:.4g}" for t in self.temperatures(calibrated))
        how = "sigmoids" if self.task == "multilabel" else f"softmax at the members' temperatures ({temps})"
        weights = "uniform" if self.spec.uniform else ", ".join(f"{w:.3g}" for w in self.weights)
        return f"ensemble of {len(self.members)}: the mean of the members' {how}, weights {weights}"

    def member_record(self, index: int, calibrated: bool = True) -> dict:
        m = self.members[index]
        return {"checkpoint": str(m.checkpoint), "run_dir": str(m.run_dir), "weight": self.weights[index],
                "temperature": self.temperatures(calibrated)[index], "backbone": m.meta.get("backbone"),
                "input_size": [int(v) for v in m.data_config["input_size"]]}


def restore_ensemble(spec: Members, overrides: Sequence[str] = ()) -> Ensemble:
    """Every member restored with `overrides` applied to each; refused unless they agree on classes and task."""
    from transfer_cli.commands.restore import restore

    members = [restore(ref, overrides) for ref in spec.refs]
    first = members[0]
    for ref, m in zip(spec.refs[1:], members[1:]):
        if m.class_names != first.class_names:
            raise TransferError(
                f"the ensemble's members disagree on the classes: {spec.refs[0]} has {', '.join(first.class_names)}, "
                f"{ref} has {', '.join(m.class_names)}",
                "ensemble runs trained on the same classes (the same names in the same order); drop the member "
                "that differs")
        if m.task != first.task:
            raise TransferError(f"the ensemble's members disagree on the task: {spec.refs[0]} is {first.task}, "
                                f"{ref} is {m.task}", "ensemble runs of one task; drop the member that differs")
    thresholds = {m.threshold for m in members}
    if first.task == "multilabel" and len(thresholds) > 1:
        log.warning("the members' multilabel_threshold differ (%s): the ensemble uses %s; set multilabel_threshold= "
                    "to choose", ", ".join(map(str, sorted(thresholds))), first.threshold)
    return Ensemble(members, list(spec.weights), spec)


def shared_preprocessing(ensemble: Ensemble) -> None:
    """Refuse an export of members that preprocess differently: one graph takes one input tensor."""
    first = ensemble.members[0]
    for ref, m in zip(ensemble.spec.refs[1:], ensemble.members[1:]):
        differ = [k for k in SHARED_PREPROCESSING if m.data_config.get(k) != first.data_config.get(k)]
        if differ:
            detail = "; ".join(f"{k} {first.data_config.get(k)} vs {m.data_config.get(k)}" for k in differ)
            raise TransferError(
                f"the ensemble's members preprocess differently ({ensemble.spec.refs[0]} vs {ref}: {detail}), so one "
                "exported graph with one input cannot hold them",
                "export each member on its own (transfer export ckpt=<member>), or predict with the ensemble of "
                "checkpoints, which preprocesses each member its own way: transfer predict ckpt=[...]")


__all__ = ["Ensemble", "restore_ensemble", "shared_preprocessing", "SHARED_PREPROCESSING"]
