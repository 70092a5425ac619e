"""Data discovery: image folders, CSV manifests, ELPV, stratified splits and the errors users see."""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from transfer_cli.config.schema import DataConfig
from transfer_cli.data.images import load_rgb
from transfer_cli.assembly.data import discover
from transfer_cli.data.splits import stratified_split
from transfer_cli.errors import TransferError


def cfg(**kw) -> DataConfig:
    kw.setdefault("num_workers", 0)
    return DataConfig(**kw)


def per_class(samples, n_classes=2):
    c = Counter(label for _, label in samples)
    return [c[k] for k in range(n_classes)]


# ---------------------------------------------------------------- sources


def test_imagefolder_presplit(tiny_imagefolder):
    s = discover(cfg(root=str(tiny_imagefolder)))
    assert s.class_names == ["cat", "dog"]
    assert per_class(s.train) == [8, 8] and per_class(s.val) == [4, 4] and s.test == []
    assert all(Path(p).parent.name == s.class_names[k] for p, k in s.train + s.val)
    assert str(tiny_imagefolder) in s.source_desc


def test_imagefolder_flat_split_is_stratified_and_seeded(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "flat", classes=("a", "b", "c"), per_class=10, layout="flat", size=8)
    data = DataConfig(source="imagefolder", root=str(root), val_fraction=0.2, test_fraction=0.1, split_seed=3)
    s = discover(data)
    assert s.class_names == ["a", "b", "c"]
    assert per_class(s.train, 3) == [7, 7, 7] and per_class(s.val, 3) == [2, 2, 2] and per_class(s.test, 3) == [1] * 3
    assert len({p for p, _ in s.train + s.val + s.test}) == 30
    again = discover(DataConfig(root=str(root), val_fraction=0.2, test_fraction=0.1, split_seed=3))
    assert (again.train, again.val, again.test) == (s.train, s.val, s.test)
    other = discover(DataConfig(root=str(root), val_fraction=0.2, test_fraction=0.1, split_seed=4))
    assert other.val != s.val


def test_imagefolder_without_val_folder_draws_val_from_train(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=10, size=8)
    for p in (root / "val").rglob("*.png"):
        p.unlink()
    for d in sorted((root / "val").rglob("*"), reverse=True):
        d.rmdir()
    (root / "val").rmdir()
    s = discover(cfg(root=str(root), val_fraction=0.3))
    assert per_class(s.train) == [7, 7] and per_class(s.val) == [3, 3]


def test_imagefolder_recursive_extensions_hidden(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", per_class=2, size=8)
    nested = root / "train" / "cat" / "sub"
    nested.mkdir()
    Image.new("RGB", (8, 8)).save(nested / "UPPER.JPG")
    Image.new("RGB", (8, 8)).save(root / "train" / "cat" / ".hidden.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    s = discover(cfg(root=str(root)))
    cat = [p for p, k in s.train if k == 0]
    assert len(cat) == 3 and any(p.endswith("UPPER.JPG") for p in cat)


def test_stratified_split_properties():
    labels = [0] * 10 + [1] * 3 + [2] * 2 + [3]
    parts = stratified_split(labels, [0.7, 0.2, 0.1], seed=0)
    assert sorted(i for p in parts for i in p) == list(range(len(labels)))
    per = [[Counter(labels[i] for i in p)[c] for p in parts] for c in range(4)]
    assert per[0] == [7, 2, 1]
    assert per[1] == [1, 1, 1]  # 3 samples: one in each nonzero part
    assert per[2][0] == 1 and sum(per[2][1:]) == 1  # 2 samples: train keeps one
    assert per[3] == [1, 0, 0]  # a single sample stays in train
    assert stratified_split(labels, [0.7, 0.2, 0.1], seed=0) == parts
    assert stratified_split(labels, [0.7, 0.2, 0.1], seed=1) != parts
    assert stratified_split(labels, [0.8, 0.2, 0.0], seed=0)[2] == []


def test_csv_with_and_without_split(tiny_imagefolder, tmp_path):
    rows = [(p.relative_to(tiny_imagefolder), p.parent.name, p.parts[-3]) for p in tiny_imagefolder.rglob("*.png")]
    with_split = tiny_imagefolder / "with.csv"
    with_split.write_text("path,label,split\n" + "".join(f"{p},{lab},{sp}\n" for p, lab, sp in rows))
    s = discover(cfg(source="csv", csv=str(with_split)))
    assert s.class_names == ["cat", "dog"] and per_class(s.train) == [8, 8] and per_class(s.val) == [4, 4]
    assert all(os.path.isabs(p) and os.path.isfile(p) for p, _ in s.train)

    no_split = tmp_path / "elsewhere" / "labels.csv"  # absolute paths, CSV in another folder
    no_split.parent.mkdir()
    no_split.write_text("path,label\n" + "".join(f"{tiny_imagefolder / p},{lab}\n" for p, lab, _ in rows))
    s2 = discover(cfg(source="csv", csv=str(no_split), val_fraction=0.25))
    assert per_class(s2.train) == [9, 9] and per_class(s2.val) == [3, 3]


def test_csv_errors_name_the_problem(tiny_imagefolder):
    bad_header = tiny_imagefolder / "h.csv"
    bad_header.write_text("file,label\nx.png,cat\n")
    with pytest.raises(TransferError, match="'path' column"):
        discover(cfg(source="csv", csv=str(bad_header)))
    missing = tiny_imagefolder / "m.csv"
    missing.write_text("path,label\ntrain/cat/img000.png,cat\nnope.png,dog\n")
    with pytest.raises(TransferError, match=r"line 3: .*nope\.png"):
        discover(cfg(source="csv", csv=str(missing)))


@pytest.mark.skipif(importlib.util.find_spec("elpv_dataset") is None, reason="elpv-dataset not installed")
def test_elpv_discovery():
    s = discover(cfg(source="elpv", val_fraction=0.2, test_fraction=0.1))
    everything = s.train + s.val + s.test
    assert len(everything) == 2624 and s.class_names == ["functional", "defective"]
    assert per_class(everything) == [1803, 821]
    assert "CC-BY-NC-SA-4.0" in s.source_desc
    assert abs(len(s.val) / 2624 - 0.2) < 0.01 and all(os.path.isfile(p) for p, _ in s.val[:5])
    four = discover(cfg(source="elpv", elpv_task="four_class"))
    assert sum(per_class(four.train + four.val, 4)[2:]) == 821
    mono = discover(cfg(source="elpv", elpv_cell_type="mono"))
    poly = discover(cfg(source="elpv", elpv_cell_type="poly"))
    assert len(mono.train + mono.val) + len(poly.train + poly.val) == 2624
    assert load_rgb(s.val[0][0]).mode == "RGB"


# ---------------------------------------------------------------- errors


def test_root_errors_mention_the_setting(tmp_path):
    with pytest.raises(TransferError) as e:
        discover(cfg(root=None))
    assert "data.root=" in e.value.fix
    with pytest.raises(TransferError) as e:
        discover(cfg(root=str(tmp_path / "nowhere")))
    assert "data.root=" in e.value.fix and "nowhere" in e.value.message
    with pytest.raises(TransferError, match="no class subfolders"):
        discover(cfg(root=str(tmp_path)))


def test_empty_class_single_class_and_empty_val(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "a", per_class=2, size=8)
    (root / "train" / "bird").mkdir()
    with pytest.raises(TransferError, match="bird"):
        discover(cfg(root=str(root)))
    single = make_image_folder(tmp_path / "b", classes=("only",), per_class=4, size=8, layout="flat")
    with pytest.raises(TransferError, match="single class"):
        discover(cfg(root=str(single)))
    flat = make_image_folder(tmp_path / "c", per_class=1, size=8, layout="flat")
    with pytest.raises(TransferError, match="validation split .* is empty"):  # one image per class stays in train
        discover(cfg(root=str(flat), val_fraction=0.2))
    no_val = discover(cfg(root=str(flat), val_fraction=0.0))  # asked for: train on everything
    assert len(no_val.train) == 2 and not no_val.val
    extra = make_image_folder(tmp_path / "d", per_class=2, size=8)
    (extra / "val" / "cow").mkdir()
    Image.new("RGB", (8, 8)).save(extra / "val" / "cow" / "x.png")
    with pytest.raises(TransferError, match="cow"):
        discover(cfg(root=str(extra)))
