"""Calibration of a trained classifier's probabilities, as pure functions of (logits, targets).

- Temperature scaling (Guo et al., ICML 2017): one scalar T > 0 divides every logit, fitted by minimizing the
  negative log-likelihood of held-out predictions. Argmax predictions do not change, only how confident they are.
- Expected calibration error: torchmetrics' equal-width-bin, L1 ECE of the top-class confidence; the per-bin
  accuracy and confidence behind a reliability diagram are computed here with the same bin edges.
- A binary decision threshold on the positive class's probability, chosen for a named criterion from the exact
  ROC points (torchmetrics' `binary_roc`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

CRITERIA = ("none", "balanced_accuracy", "f1", "recall")
# The temperature is searched as log T in this range: past it, a val split that the network separates perfectly
# would drive T towards 0 (ever sharper probabilities, ever lower NLL), which no other image would bear out.
LOG_T_RANGE = (math.log(1e-2), math.log(1e2))


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `targets` under softmax(logits / temperature), in float64."""
    return float(F.cross_entropy(logits.double() / temperature, targets.long()))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The T that minimizes the NLL of softmax(logits / T): full-batch L-BFGS on log T (so T stays positive),
    in float64, from T = 1. Returns 1.0 when the fit finds nothing better than T = 1 (e.g. an empty split)."""
    if not len(targets):
        return 1.0
    z, y = logits.detach().double().cpu(), targets.detach().long().cpu()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z * torch.exp(-log_t.clamp(*LOG_T_RANGE)), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = math.exp(min(max(float(log_t.detach()), LOG_T_RANGE[0]), LOG_T_RANGE[1]))
    if not math.isfinite(temperature) or nll(z, y, temperature) >= nll(z, y, 1.0):
        return 1.0
    return temperature


def ece(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence: torchmetrics' multiclass ECE, equal-width bins
    over [0, 1], L1 (sum over bins of |accuracy - confidence| x the bin's share of the images)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    if not len(targets):
        return float("nan")
    return float(multiclass_calibration_error(probs.float(), targets.long(), num_classes=probs.shape[1],
                                              n_bins=bins, norm="l1"))


@dataclass
class ReliabilityBins:
    """Per equal-width confidence bin: its edges, how many images fall in it, their mean confidence and accuracy
    (None for an empty bin)."""

    edges: list[float]
    counts: list[int]
    confidence: list[Optional[float]]
    accuracy: list[Optional[float]]


def reliability_bins(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> ReliabilityBins:
    """The bins of a reliability diagram. Bin i holds confidences in [edge_i, edge_i+1), as torchmetrics bins
    them; a confidence of exactly 1 joins the last bin."""
    confidence, predicted = probs.float().max(dim=1)
    correct = predicted.eq(targets.long()).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins)
    conf_sum = torch.zeros(bins, dtype=torch.float64).scatter_add_(0, index, confidence.double())
    acc_sum = torch.zeros(bins, dtype=torch.float64).scatter_add_(0, index, correct)
    return ReliabilityBins(
        edges=edges.tolist(), counts=[int(c) for c in counts],
        confidence=[float(s / c) if c else None for s, c in zip(conf_sum, counts)],
        accuracy=[float(s / c) if c else None for s, c in zip(acc_sum, counts)])


@dataclass
class ThresholdChoice:
    threshold: float  # predict the positive class when its probability >= this
    criterion: str
    target_recall: Optional[float]
    # on the split it was chosen on, at that threshold
    recall: float
    specificity: float
    precision: float
    f1: float
    balanced_accuracy: float

    def summary(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def binary_scores(positive_probs: torch.Tensor, positive: torch.Tensor, threshold: float) -> dict:
    """recall, specificity, precision, F1, balanced accuracy and accuracy of `p >= threshold` against `positive`
    (a boolean per image)."""
    pred, pos = positive_probs >= threshold, positive.bool()
    tp, fp = int((pred & pos).sum()), int((pred & ~pos).sum())
    fn, tn = int((~pred & pos).sum()), int((~pred & ~pos).sum())
    recall = tp / (tp + fn) if tp + fn else 0.0
    specificity = tn / (tn + fp) if tn + fp else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    return {"recall": recall, "specificity": specificity, "precision": precision,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
            "balanced_accuracy": (recall + specificity) / 2, "accuracy": (tp + tn) / max(1, len(pos))}


def choose_threshold(positive_probs: torch.Tensor, positive: torch.Tensor, criterion: str,
                     target_recall: Optional[float] = None) -> ThresholdChoice:
    """The decision threshold on the positive class's probability that is best for `criterion` on these images:
    balanced_accuracy or f1: the highest threshold that maximizes it; recall: the highest threshold whose recall
    is at least `target_recall` (so the fewest false positives that meet it).

    The candidates are the ROC's operating points (each distinct score: `p >= score`); the threshold returned
    lies halfway between the chosen score and the next lower one, which makes the same decisions on these images
    and leaves a margin for rounding and for new images."""
    from torchmetrics.functional.classification import binary_roc

    if criterion not in CRITERIA[1:]:
        raise ValueError(f"criterion must be one of {CRITERIA[1:]}, got {criterion!r}")
    probs, pos = positive_probs.detach().float().cpu(), positive.detach().bool().cpu()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        raise ValueError(f"a threshold needs both classes among the images ({n_pos} positive, {n_neg} negative)")
    fpr, tpr, scores = binary_roc(probs, pos.long())
    # Point 0 is the ROC's start (nothing positive), which torchmetrics labels with the threshold 1.0.
    fpr, tpr, scores = fpr[1:].double(), tpr[1:].double(), scores[1:].double()
    tp, fp = tpr * n_pos, fpr * n_neg
    if criterion == "balanced_accuracy":
        value = (tpr + 1 - fpr) / 2
    elif criterion == "f1":
        value = 2 * tp / (tp + fp + n_pos)
    else:
        if target_recall is None or not 0 < target_recall <= 1:
            raise ValueError(f"criterion=recall needs a target_recall in (0, 1], got {target_recall!r}")
        value = (tpr >= target_recall - 1e-12).double()  # reachable: the last point has recall 1
    best = int(torch.nonzero(value >= value.max() - 1e-12)[0])  # scores decrease: the first is the highest
    lower = float(scores[best + 1]) if best + 1 < len(scores) else 0.0
    threshold = (float(scores[best]) + lower) / 2
    got = binary_scores(probs, pos, threshold)
    return ThresholdChoice(threshold, criterion, target_recall if criterion == "recall" else None,
                           got["recall"], got["specificity"], got["precision"], got["f1"], got["balanced_accuracy"])


def fit_calibration(logits: torch.Tensor, targets: torch.Tensor, class_names: list[str], *, temperature: bool,
                    criterion: str = "none", target_recall: Optional[float] = None, positive_index: int = 1,
                    bins: int = 15) -> dict:
    """The calibration block of one checkpoint (plain data: it goes into the checkpoint and summary.json) from
    its held-out (val) logits: the temperature, NLL and ECE before and after it, and with `criterion` on a
    two-class task the decision threshold on the positive class's calibrated probability."""
    t = fit_temperature(logits, targets) if temperature else 1.0
    before, after = logits.float().softmax(-1), (logits.double() / t).float().softmax(-1)
    block: dict = {"fitted_on": "val", "images": int(len(targets)), "temperature": t,
                   "temperature_fitted": bool(temperature), "nll_val_before": nll(logits, targets),
                   "nll_val_after": nll(logits, targets, t), "bins": int(bins),
                   "ece_val_before": ece(before, targets, bins), "ece_val_after": ece(after, targets, bins),
                   "criterion": criterion, "threshold": None}
    if criterion != "none":
        positive = targets.long() == positive_index
        choice = choose_threshold(after[:, positive_index], positive, criterion, target_recall)
        block.update(threshold=choice.threshold, positive_class=class_names[positive_index],
                     positive_index=int(positive_index), target_recall=choice.target_recall,
                     val_at_threshold={k: v for k, v in choice.summary().items()
                                       if k not in ("threshold", "criterion", "target_recall")})
    return block


def calibrated_probabilities(logits: torch.Tensor, block: Optional[dict]) -> torch.Tensor:
    """softmax(logits / T) with the block's temperature (T = 1 without one), in float32."""
    t = float((block or {}).get("temperature") or 1.0)
    return (logits.double() / t).float().softmax(-1)


__all__ = ["fit_calibration", "calibrated_probabilities", "fit_temperature", "nll", "ece", "reliability_bins", "ReliabilityBins", "choose_threshold",
           "ThresholdChoice", "binary_scores", "CRITERIA"]
