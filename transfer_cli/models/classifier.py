"""The network that trains: a timm backbone (pooled features) followed by a new head sized from the data."""

from __future__ import annotations

import torch
from torch import nn

from transfer_cli.models.stages import backbone_stages


class Head(nn.Module):
    """Linear, or Linear-ReLU-Dropout-Linear when a hidden width is given."""

    def __init__(self, in_features: int, num_classes: int, hidden_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        if hidden_dim > 0:
            layers += [nn.Linear(in_features, hidden_dim), nn.ReLU(inplace=True)]
            layers += [nn.Dropout(dropout)] if dropout > 0 else []
            in_features = hidden_dim
        layers.append(nn.Linear(in_features, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class Classifier(nn.Module):
    """backbone -> head. The transfer mode sets `frozen_backbone` (features without autograd) and `eval_modules`
    (frozen BatchNorm, or the whole frozen backbone), which stay in eval mode whatever `.train()` Lightning
    calls, so running statistics of frozen layers never move."""

    def __init__(self, backbone: nn.Module, num_classes: int, hidden_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.num_features = int(backbone.num_features)
        self.head = Head(self.num_features, num_classes, hidden_dim, dropout)
        self.stages = backbone_stages(backbone)
        self.frozen_backbone = False
        self.eval_modules: list[nn.Module] = []

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        for module in self.eval_modules:
            module.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.frozen_backbone:
            with torch.no_grad():  # no autograd graph through a frozen backbone: less memory, faster
                return self.backbone(images)
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
