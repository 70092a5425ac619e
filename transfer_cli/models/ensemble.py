"""An ensemble's prediction: the weighted mean of its members' probabilities, each at the member's own temperature.

Probabilities are averaged, not logits: members' logits live on different scales (a probe solved on standardized
features reaches logits of ~15, a fine-tuned network ~5), and the mean of calibrated probabilities is itself a
probability that needs no calibration of its own. Multi-class members give softmax(logits / T), multi-label members
a sigmoid per label (T = 1: no temperature per label is fitted).

`as_logits` maps the mean back to logits whose softmax (or sigmoid) is that mean, so everything downstream that
reads logits (metrics, mistakes, ECE, the prediction CSV) reads an ensemble as it reads one network.
`EnsembleNet` is the same computation as one module, for export (ONNX, TorchScript): input normalized images, output
the mean probabilities.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from transfer_cli.training.predictions import probabilities


def member_probabilities(logits: torch.Tensor, task: str, temperature: float = 1.0) -> torch.Tensor:
    """One member's probabilities: softmax(logits / T) per image, or sigmoid(logits) per label (multilabel)."""
    return probabilities(logits if temperature == 1.0 else logits / temperature, task)


def average(probs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i * p_i (the weights sum to 1)."""
    if len(probs) != len(weights) or not probs:
        raise ValueError(f"{len(probs)} members' probabilities for {len(weights)} weights")
    total = probs[0] * float(weights[0])
    for p, w in zip(probs[1:], weights[1:]):
        total = total + p * float(w)
    return total


def as_logits(probs: torch.Tensor, task: str) -> torch.Tensor:
    """Logits whose softmax (multiclass) or sigmoid (multilabel) is `probs`: log p, or log(p / (1 - p)); in float64
    and clamped away from 0 and 1, so a member's certainty never becomes an infinite loss."""
    p = probs.double()
    tiny = torch.finfo(torch.float32).tiny
    if task == "multilabel":
        p = p.clamp(tiny, 1 - 1e-12)
        return (p.log() - (-p).log1p()).float()
    return p.clamp_min(tiny).log().float()


def ensemble_logits(logits: Sequence[torch.Tensor], task: str, temperatures: Sequence[float],
                    weights: Sequence[float]) -> torch.Tensor:
    """The ensemble's outputs on the same images, as logits (see as_logits), from each member's logits."""
    probs = [member_probabilities(z, task, t) for z, t in zip(logits, temperatures)]
    return as_logits(average(probs, weights), task)


class EnsembleNet(nn.Module):
    """Members sharing one preprocessing, as one network: normalized images -> the mean of their probabilities."""

    def __init__(self, members: Sequence[nn.Module], task: str, temperatures: Sequence[float],
                 weights: Sequence[float]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.task = task
        self.temperatures = [float(t) for t in temperatures]
        self.weights = [float(w) for w in weights]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probs = [member_probabilities(m(images), self.task, t) for m, t in zip(self.members, self.temperatures)]
        return average(probs, self.weights)


__all__ = ["member_probabilities", "average", "as_logits", "ensemble_logits", "EnsembleNet"]
