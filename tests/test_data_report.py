"""The data report: counts, imbalance, headers, unreadable files and byte-identical files across splits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
from conftest import PROBE, class_image, write_class_images
from PIL import Image

from transfer_cli.data.report import duplicate_groups, imbalance_ratio

def test_duplicate_groups_are_byte_identical_files_in_two_splits(tmp_path):
    rng = np.random.default_rng(0)
    train, test = tmp_path / "train", tmp_path / "test"
    write_class_images(train, 0, 3, 16, rng)  # img000..img002
    write_class_images(test, 0, 2, 16, rng)
    shutil.copy(train / "img001.png", test / "leak.png")  # the same bytes under another name
    shutil.copy(train / "img002.png", train / "copy_in_train.png")  # a copy inside one split is no leak
    same_size = test / "same_size.png"  # as large as a training file, but other bytes
    same_size.write_bytes(bytes(255 - b for b in (train / "img000.png").read_bytes()))
    groups = duplicate_groups({"train": sorted(map(str, train.glob("*.png"))),
                               "test": sorted(map(str, test.glob("*.png")))})
    assert [g.files for g in groups] == [(("test", str(test / "leak.png")), ("train", str(train / "img001.png")))]
    assert groups[0].splits == ["test", "train"] and len(groups[0].sha256) == 64
    assert duplicate_groups({"train": [str(train / "img000.png")], "test": [str(tmp_path / "missing.png")]}) == []


def test_imbalance_ratio():
    assert imbalance_ratio([10, 5, 2]) == 5.0
    assert imbalance_ratio([4, 0]) is None  # a class without images: unbounded


def test_data_report_command_without_torch(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(1)
    write_class_images(root / "train" / "cat", 0, 6, 32, rng)
    write_class_images(root / "train" / "dog", 1, 2, 48, rng)
    write_class_images(root / "val" / "cat", 0, 2, 32, rng)
    write_class_images(root / "val" / "dog", 1, 1, 32, rng)
    class_image(1, 24, rng).convert("L").save(root / "val" / "dog" / "gray.png")
    Image.new("RGBA", (40, 20)).save(root / "train" / "cat" / "alpha.png")
    (root / "train" / "dog" / "broken.png").write_bytes(b"not an image")
    shutil.copy(root / "train" / "cat" / "img000.png", root / "val" / "cat" / "leaked.png")
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-c", PROBE, "data-report", "~experiment", "data=imagefolder",
                           f"data.root={root}", f"output={out}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stderr  # no torch, Lightning or timm
    report = json.loads((out / "data_report.json").read_text())
    assert report["class_names"] == ["cat", "dog"]
    assert report["per_class"] == {"train": {"cat": 7, "dog": 3}, "val": {"cat": 3, "dog": 2}}
    assert report["imbalance_ratio"] == round(7 / 3, 3) and report["largest_class"] == "cat"
    headers = report["headers"]
    assert headers["sizes"] == {"32x32": 10, "48x48": 2, "40x20": 1, "24x24": 1}
    assert headers["modes"] == {"RGB": 12, "L": 1, "RGBA": 1}
    assert [u["path"] for u in headers["unreadable"]] == [str(root / "train" / "dog" / "broken.png")]
    [group] = report["duplicates_across_splits"]
    assert {(f["split"], f["path"]) for f in group["files"]} == {
        ("train", str(root / "train" / "cat" / "img000.png")), ("val", str(root / "val" / "cat" / "leaked.png"))}
    printed = " ".join(done.stdout.split())
    assert "byte-identical across splits: 1 group(s)" in printed and "unreadable: 1 file(s)" in printed
    with Image.open(out / "class_distribution.png") as png:
        assert png.format == "PNG" and png.width > 300


def test_data_report_arguments_are_the_data_overrides(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE, "data-report", "optimizer.lr=0.1"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and "unknown argument 'optimizer.lr'" in done.stderr and "fix:" in done.stderr
