"""Weight averaging of fine-tuned runs from the same start (model soups, Wortsman et al., ICML 2022).

Runs fine-tuned from the same initial weights often land in one low-loss basin, where the mean of their weights is
itself a good network (one forward pass, unlike an ensemble). The mean only means something for networks of one
architecture: every tensor name and shape must match. Floating tensors (weights and BatchNorm running statistics
alike) are averaged in float64 and cast back, so a soup of identical checkpoints is that checkpoint bit for bit;
integer tensors (BatchNorm's num_batches_tracked) are the first member's.

`greedy_soup` is the paper's Algorithm 1: members sorted by their own validation score, best first; each is added
when the soup with it scores at least as well on validation as the soup without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]


def mismatch(first: StateDict, other: StateDict) -> str | None:
    """What makes two state dicts unaveragable (names, shapes, dtypes), or None."""
    missing, extra = sorted(set(first) - set(other)), sorted(set(other) - set(first))
    if missing or extra:
        parts = ([f"lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing else []) + \
                ([f"has {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} besides"] if extra else [])
        return "; ".join(parts)
    for name, tensor in first.items():
        if tensor.shape != other[name].shape or tensor.dtype != other[name].dtype:
            return (f"{name} is {tuple(other[name].shape)} {other[name].dtype}, not {tuple(tensor.shape)} "
                    f"{tensor.dtype}")
    return None


def average_state_dicts(state_dicts: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """The uniform mean of `state_dicts` (of one architecture: check `mismatch` first)."""
    if not state_dicts:
        raise ValueError("no state dicts to average")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dicts[0].items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        total = torch.zeros(tensor.shape, dtype=torch.float64)
        for sd in state_dicts:
            total += sd[name].double()
        out[name] = (total / len(state_dicts)).to(tensor.dtype)
    return out


@dataclass
class GreedySoup:
    order: list[int]  # member indices, best first
    chosen: list[int]  # the ingredients, in the order they were added
    member_scores: list[float]  # each member alone, by index
    steps: list[dict] = field(default_factory=list)  # per member tried: its index, the soup's score with it, kept
    score: float = float("nan")  # the chosen soup's
    state_dict: dict = field(default_factory=dict)


def greedy_soup(state_dicts: Sequence[StateDict], score: Callable[[StateDict], float],
                higher_is_better: bool = True) -> GreedySoup:
    """Wortsman et al.'s greedy soup: `score` is the validation score of a state dict."""
    sign = 1.0 if higher_is_better else -1.0
    member_scores = [float(score(sd)) for sd in state_dicts]
    order = sorted(range(len(state_dicts)), key=lambda i: -sign * member_scores[i])  # stable: ties keep their order
    chosen = [order[0]]
    best, soup = member_scores[order[0]], dict(state_dicts[order[0]])
    steps = [{"member": order[0], "score": best, "kept": True}]
    for i in order[1:]:
        candidate = average_state_dicts([state_dicts[j] for j in [*chosen, i]])
        value = float(score(candidate))
        kept = sign * value >= sign * best  # Algorithm 1: at least as good on val
        steps.append({"member": i, "score": value, "kept": kept})
        if kept:
            chosen.append(i)
            best, soup = value, candidate
    return GreedySoup(order, chosen, member_scores, steps, best, soup)


__all__ = ["mismatch", "average_state_dicts", "greedy_soup", "GreedySoup"]
