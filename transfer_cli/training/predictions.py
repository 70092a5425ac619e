"""Model outputs as answers: class probabilities and the predicted label(s) of each image, by task.

Pure functions of (logits, class names, task, threshold), shared by whatever turns outputs into files
(predict, eval), so a multi-label checkpoint always answers with label sets and a multiclass one with a class.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch


class Prediction(NamedTuple):
    labels: List[str]  # multiclass: the top class alone; multilabel: every label at or over the threshold, maybe none
    scores: List[float]  # per class, in class_names order: softmax (multiclass) or sigmoid (multilabel) probabilities


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """(N, C) logits to probabilities: one distribution per image (softmax), or one per label (sigmoid)."""
    logits = logits.detach().float()
    return logits.sigmoid() if task == "multilabel" else logits.softmax(dim=-1)


def decode_predictions(
    logits: torch.Tensor, class_names: Sequence[str], task: str, threshold: float = 0.5,
    binary_rule: Optional[Tuple[int, float]] = None,
) -> List[Prediction]:
    """One Prediction per row of `logits` (N, C). `threshold` only matters for task=multilabel; `binary_rule`
    (positive class index, threshold), for two classes, predicts that class where its probability >= threshold
    instead of the most probable class."""
    if logits.ndim != 2 or logits.shape[1] != len(class_names):
        raise ValueError(f"expected logits of shape (N, {len(class_names)}), got {tuple(logits.shape)}")
    probs = probabilities(logits, task).cpu()
    if task == "multilabel":
        chosen = [torch.nonzero(row >= threshold).flatten().tolist() for row in probs]
    elif binary_rule is not None:
        positive, cut = binary_rule
        chosen = [[positive if float(row[positive]) >= cut else 1 - positive] for row in probs]
    else:
        chosen = [[int(i)] for i in probs.argmax(dim=-1)]
    return [
        Prediction([class_names[i] for i in indices], row.tolist()) for indices, row in zip(chosen, probs)
    ]


__all__ = ["Prediction", "probabilities", "decode_predictions"]
