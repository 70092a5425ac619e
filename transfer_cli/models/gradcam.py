"""Grad-CAM maps of our Classifier with the grad-cam package (pytorch-grad-cam), on any timm backbone.

The target layer is the backbone's last stage as timm's `feature_info` names it (EfficientNet `blocks.6`, ResNet
`layer4`, ConvNeXt `stages.3`). Token models (ViT, DeiT, ...) pool the class token, which the last block's output
tokens never reach, so their CAM would be zero there: the target is that block's first norm (`blocks.11.norm1`),
whose patch tokens the class token attends to, reshaped from (B, prefix + H*W, C) to (B, C, H, W) by dropping
timm's `num_prefix_tokens`. Feature combinations work too: several feature levels use the deepest chosen level,
several backbones one layer each, and grad-cam averages their maps (each resized to the input).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from transfer_cli.errors import TransferError
from transfer_cli.models.classifier import Classifier
from transfer_cli.models.combined import CombinedBackbone, PooledStages

GRADCAM_EXTRA = "pip install 'transfer-cli[explain]'  (the grad-cam package)"


def require_gradcam() -> None:
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        raise TransferError("Grad-CAM needs the grad-cam package, which is not installed", GRADCAM_EXTRA) from None


def _tokens(model: nn.Module) -> Optional[tuple[int, tuple[int, int]]]:
    """(prefix tokens, patch grid) of a timm token model, None for a convolutional one."""
    prefix = getattr(model, "num_prefix_tokens", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return None if prefix is None or grid is None else (int(prefix), (int(grid[0]), int(grid[1])))


def _last_stage(model: nn.Module, level: int = -1) -> tuple[nn.Module, Optional[tuple[int, tuple[int, int]]]]:
    info = getattr(model, "feature_info", None)
    if not info:
        raise TransferError(f"{type(model).__name__} has no timm feature_info to take a Grad-CAM layer from",
                            "name the layer: layer=<module path under model.backbone, e.g. layer4>")
    stage = model.get_submodule(info[level]["module"])
    tokens = _tokens(model)
    if tokens is not None and hasattr(stage, "norm1"):
        return stage.norm1, tokens
    return stage, tokens


def target_layers(backbone: nn.Module) -> list[tuple[nn.Module, Optional[tuple[int, tuple[int, int]]]]]:
    """[(layer, token layout or None)] whose activations Grad-CAM weighs, one per backbone of a combination."""
    if isinstance(backbone, CombinedBackbone):
        return [layer for member in backbone.members for layer in target_layers(member)]
    if isinstance(backbone, PooledStages):
        return [_last_stage(backbone.model, max(backbone.indices))]
    return [_last_stage(backbone)]


def _reshape(layouts: Sequence[tuple[int, tuple[int, int]]]) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    if not layouts:
        return None

    def to_map(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:  # a convolutional member of a combination: already (B, C, H, W)
            return x
        for prefix, (gh, gw) in layouts:
            if x.shape[1] == prefix + gh * gw:
                return x[:, prefix:, :].reshape(x.shape[0], gh, gw, x.shape[2]).permute(0, 3, 1, 2)
        prefix = layouts[0][0]
        side = math.isqrt(x.shape[1] - prefix)  # another input size than the model was built for: a square grid
        if side * side != x.shape[1] - prefix:
            raise TransferError(f"cannot lay {x.shape[1]} tokens out as a patch grid for Grad-CAM",
                                "use the input size the backbone was built with (data.image_size)")
        return x[:, prefix:, :].reshape(x.shape[0], side, side, x.shape[2]).permute(0, 3, 1, 2)

    return to_map


def gradcam_maps(model: Classifier, images: torch.Tensor, targets: Sequence[int], layer: Optional[str] = None
                 ) -> np.ndarray:
    """(B, H, W) maps in [0, 1]: where `images` hold evidence for class `targets[i]` (a logit index)."""
    require_gradcam()
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if layer:
        try:
            chosen = [(model.backbone.get_submodule(layer), _tokens(model.backbone))]
        except AttributeError:
            raise TransferError(f"layer={layer} is not a module of the backbone",
                                "e.g. layer=" + str(getattr(model.backbone, "feature_info", [{}])[-1].get(
                                    "module", "<module path>")))
    else:
        chosen = target_layers(model.backbone)
    frozen = model.frozen_backbone
    model.frozen_backbone = False  # a frozen backbone's features carry no gradient to weigh the maps with
    try:
        with GradCAM(model=model, target_layers=[m for m, _ in chosen],
                     reshape_transform=_reshape([t for _, t in chosen if t is not None])) as cam:
            with torch.enable_grad():
                # inputs that require grad: activations carry gradients even where the weights do not
                maps = cam(input_tensor=images.detach().clone().requires_grad_(True), targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        model.frozen_backbone = frozen
    return np.asarray(maps, dtype=np.float32)


def overlay(image: np.ndarray, cam: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """An (H, W, 3) image in [0, 1] with its map laid over it (jet colours), as floats in [0, 1]."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(np.clip(image, 0, 1).astype(np.float32), cam, use_rgb=True,
                             image_weight=1 - weight).astype(np.float32) / 255.0


__all__ = ["gradcam_maps", "target_layers", "overlay", "require_gradcam", "GRADCAM_EXTRA"]
