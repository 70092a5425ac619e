"""Feature combination: pooled features of several stages of a backbone and/or of several backbones, concatenated.

`model.feature_stages=[-1, -2]` pools timm feature levels (timm's `out_indices`: feature_info positions, negative
from the end) instead of the backbone's usual pooled output; `model.backbones=[a, b]` concatenates the features of
several timm models. Each backbone of a combination normalizes its input with its own mean/std (the data
pipeline then only scales pixels to [0, 1]), so a model trained on other statistics sees what it expects.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from transfer_cli.errors import TransferError
from transfer_cli.models.backbone import create_backbone, resolve_data_config
from transfer_cli.models.named_weights import NAMED_WEIGHTS
from transfer_cli.models.stages import Stage, backbone_stages, timm_stages


def _prefixed(stages: List[Stage], name_prefix: str, param_prefix: str) -> List[Stage]:
    return [Stage(name_prefix + s.name, s.index, s.depth, [param_prefix + p for p in s.params]) for s in stages]


class PooledStages(nn.Module):
    """A timm model's feature levels `indices`, each global-average-pooled, concatenated."""

    def __init__(self, model: nn.Module, indices: Sequence[int]):
        super().__init__()
        levels = len(model.feature_info)
        if not indices or any(not -levels <= int(i) < levels for i in indices):
            raise TransferError(f"model.feature_stages={list(indices)}: this backbone has {levels} feature levels",
                                f"use indices in [-{levels}, {levels - 1}], e.g. model.feature_stages=[-1,-2]")
        self.indices = sorted({int(i) % levels for i in indices})
        self.model = model
        self.num_features = sum(int(model.feature_info[i]["num_chs"]) for i in self.indices)
        self.pretrained_cfg = model.pretrained_cfg

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # forward_intermediates returns the levels in ascending order, the order num_features was summed in.
        levels = self.model.forward_intermediates(images, indices=self.indices, intermediates_only=True)
        return torch.cat([F.adaptive_avg_pool2d(x, 1).flatten(1) for x in levels], dim=1)

    def transfer_stages(self) -> List[Stage]:
        return _prefixed(timm_stages(self.model), "", "model.")


class CombinedBackbone(nn.Module):
    """Several backbones over the same [0, 1] images, each with its own normalization; features concatenated."""

    def __init__(self, members: Sequence[nn.Module], norms: Sequence[Tuple[Sequence[float], Sequence[float]]]):
        super().__init__()
        self.members = nn.ModuleList(members)
        for i, (mean, std) in enumerate(norms):
            self.register_buffer(f"mean{i}", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer(f"std{i}", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.num_features = sum(int(m.num_features) for m in members)
        self.pretrained_cfg = members[0].pretrained_cfg

    def set_member_norms(self, norms: Sequence[Tuple[Sequence[float], Sequence[float]]]) -> None:
        """Each member's (mean, std). They live in non-persistent buffers, so a checkpoint's state_dict lacks them:
        a network rebuilt from a checkpoint gets them from its metadata (data_config["member_norms"])."""
        for i, (mean, std) in enumerate(norms):
            getattr(self, f"mean{i}").copy_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            getattr(self, f"std{i}").copy_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i, member in enumerate(self.members):
            x = (images - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")
            out.append(member(x))
        return torch.cat(out, dim=1)

    def transfer_stages(self) -> List[Stage]:
        stages: List[Stage] = []
        for i, member in enumerate(self.members):
            stages += _prefixed(backbone_stages(member), f"m{i}.", f"members.{i}.")
        return stages


def _one(model_cfg: Any, data_cfg: Any, name: str, weights: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    member_cfg = dataclasses.replace(model_cfg, backbone=name, weights=weights, backbones=[])
    backbone = create_backbone(member_cfg)
    named = NAMED_WEIGHTS.get(weights) if weights else None
    data_config = resolve_data_config(backbone, data_cfg, named)
    if model_cfg.feature_stages:
        backbone = PooledStages(backbone, list(model_cfg.feature_stages))
    return backbone, data_config


def build_backbone(model_cfg: Any, data_cfg: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """The configured backbone (single, multi-stage or combined) and the data pipeline's preprocessing, from the
    model and data groups' records."""
    names = list(model_cfg.backbones or [])
    if not names:
        return _one(model_cfg, data_cfg, model_cfg.backbone, model_cfg.weights)
    # model.weights belongs to the first backbone; the others follow model.pretrained.
    built = [_one(model_cfg, data_cfg, name, model_cfg.weights if i == 0 else None) for i, name in enumerate(names)]
    members = [b for b, _ in built]
    norms = [(c["mean"], c["std"]) for _, c in built]
    pipeline = dict(built[0][1])  # input size, crop and interpolation of the first backbone
    channels = int(pipeline["input_size"][0])
    pipeline["mean"], pipeline["std"] = (0.0,) * channels, (1.0,) * channels
    pipeline["member_norms"] = [{"backbone": n, "mean": list(m), "std": list(s)} for n, (m, s) in zip(names, norms)]
    return CombinedBackbone(members, norms), pipeline
