"""Which images a model gets wrong, worst first, and which classes it confuses: pure functions of (logits,
targets, class names, task, threshold), as in fastai's `top_losses` and `most_confused`.

Multiclass: an image is misclassified when its top class is not its class; its loss is the cross-entropy of its
logits (without label smoothing), its confidence the probability of the predicted class. Multi-label: an image is
misclassified when its predicted label set (the labels at or over the threshold) differs from its true set; its
loss is the binary cross-entropy averaged over the labels, as the training criterion computes it, and its
confidence the mean probability the model gave to each of its own yes/no decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypedDict

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ImageOutcome:
    index: int  # the image's row in the logits
    true: list[str]  # multiclass: one class
    predicted: list[str]  # multiclass: the top class; multilabel: the labels at or over the threshold
    confidence: float
    true_probability: float  # multiclass: the probability of the true class; multilabel: mean over true labels
    loss: float
    target: int  # the class whose evidence an explanation shows: the predicted class, or the worst label

    @property
    def wrong(self) -> bool:
        return sorted(self.true) != sorted(self.predicted)


def per_image_loss(logits: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    logits = logits.float()
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none").mean(dim=1)
    return F.cross_entropy(logits, targets.long(), reduction="none")


def rank_outcomes(logits: torch.Tensor, targets: torch.Tensor, names: Sequence[str], task: str,
                  threshold: float = 0.5) -> list[ImageOutcome]:
    """Every image's outcome, the highest loss first (ties: the earlier image first)."""
    losses = per_image_loss(logits, targets, task)
    out = []
    if task == "multilabel":
        probs, truth = logits.float().sigmoid(), targets.float() >= 0.5
        chosen = probs >= threshold
        decision = torch.where(chosen, probs, 1 - probs).mean(dim=1)
        per_label = F.binary_cross_entropy_with_logits(logits.float(), truth.float(), reduction="none")
        for i in range(len(logits)):
            true_p = float(probs[i][truth[i]].mean()) if truth[i].any() else float("nan")
            out.append(ImageOutcome(i, [names[j] for j in torch.nonzero(truth[i]).flatten().tolist()],
                                    [names[j] for j in torch.nonzero(chosen[i]).flatten().tolist()],
                                    float(decision[i]), true_p, float(losses[i]), int(per_label[i].argmax())))
    else:
        probs = logits.float().softmax(dim=1)
        top = probs.argmax(dim=1)
        for i in range(len(logits)):
            t, p = int(targets[i]), int(top[i])
            out.append(ImageOutcome(i, [names[t]], [names[p]], float(probs[i, p]), float(probs[i, t]),
                                    float(losses[i]), p))
    return sorted(out, key=lambda o: (-o.loss, o.index))


class ConfusedPair(TypedDict):
    """A row of most_confused (a plain dict at run time: evaluate writes it into its report as it is)."""
    true: str
    predicted: str
    count: int
    share_of_true: float


class LabelErrors(TypedDict):
    """A row of label_errors."""
    label: str
    missed: int
    spurious: int
    errors: int


def most_confused(matrix: Sequence[Sequence[int]], names: Sequence[str], top: int = 10) -> list[ConfusedPair]:
    """The (true, predicted) pairs with the most images, from a multiclass confusion matrix (rows: true)."""
    pairs: list[ConfusedPair] = []
    for i, row in enumerate(matrix):
        support = sum(row)
        for j, count in enumerate(row):
            if i != j and count > 0:
                pairs.append({"true": names[i], "predicted": names[j], "count": int(count),
                              "share_of_true": round(count / support, 4)})
    return sorted(pairs, key=lambda p: (-p["count"], -p["share_of_true"], p["true"], p["predicted"]))[:top]


def label_errors(matrices: Sequence[Sequence[Sequence[int]]], names: Sequence[str],
                 top: int = 10) -> list[LabelErrors]:
    """Multi-label: the labels with the most errors, from per-label [[TN, FP], [FN, TP]] matrices."""
    rows: list[LabelErrors] = [
        {"label": name, "missed": int(m[1][0]), "spurious": int(m[0][1]), "errors": int(m[1][0] + m[0][1])}
        for name, m in zip(names, matrices)]
    return sorted((r for r in rows if r["errors"]), key=lambda r: (-r["errors"], r["label"]))[:top]


__all__ = ["ImageOutcome", "rank_outcomes", "per_image_loss", "most_confused", "label_errors", "ConfusedPair",
           "LabelErrors"]
