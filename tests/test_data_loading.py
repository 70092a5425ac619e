"""Image decoding, transforms, shuffling and the data module's bad-image handling, on tiny real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transfer_cli.assembly.data import discover, image_data
from transfer_cli.config.schema import AugmentationConfig, DataConfig, TrainConfig
from transfer_cli.data.datamodule import Batch
from transfer_cli.data.images import ImageDataset, load_rgb, scan_images
from transfer_cli.data.samplers import EpochShuffleSampler
from transfer_cli.data.transforms import build_transform
from transfer_cli.errors import TransferError

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
DATA_CONFIG = {"input_size": (3, 24, 24), "interpolation": "bilinear", "crop_pct": 0.875, "mean": MEAN, "std": STD}


def cfg(**kw) -> DataConfig:
    kw.setdefault("num_workers", 0)
    return DataConfig(**kw)


def aug(**kw) -> AugmentationConfig:
    return AugmentationConfig(**kw)


def truncate_png(path: Path, keep: int = 300) -> None:
    data = path.read_bytes()
    assert len(data) > keep
    path.write_bytes(data[:keep])


def make_dm(splits, tmp_path, **data_kw):
    return image_data(TrainConfig(seed=7, data=cfg(**data_kw), augmentation=aug()), splits, DATA_CONFIG,
                      bad_log=tmp_path / "bad.tsv")


# ---------------------------------------------------------------- bad images


def test_corrupt_images_within_budget_are_skipped_and_logged(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4, size=8, bad=2)
    splits = discover(cfg(root=str(root)))
    assert len(splits.train) == 10  # discovery only lists paths
    dm = make_dm(splits, tmp_path, max_bad_images=2)
    dm.setup("fit")
    assert len(dm.samples("train")) == 8 and len(dm.bad_images) == 2
    log = (tmp_path / "bad.tsv").read_text().splitlines()
    assert len(log) == 2 and all(line.split("\t")[0].endswith(".png") and "\t" in line for line in log)
    assert scan_images(splits.train, budget=5) == dm.bad_images

    over = make_dm(splits, tmp_path / "over", max_bad_images=1)
    with pytest.raises(TransferError, match="corrupt000") as e:
        over.setup("fit")
    assert "data.max_bad_images" in e.value.fix
    assert len((tmp_path / "over" / "bad.tsv").read_text().splitlines()) == 2  # listed even when fatal


# ---------------------------------------------------------------- decoding and transforms


def _odd_images(tmp_path: Path) -> dict:
    out = {}
    gray = tmp_path / "gray.png"
    Image.new("L", (40, 30), 128).save(gray)
    out["L"] = gray
    la = tmp_path / "la.png"
    Image.new("LA", (40, 30), (128, 255)).save(la)
    out["LA"] = la
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (30, 40), (128, 128, 128, 255)).save(rgba)
    out["RGBA"] = rgba
    pal = tmp_path / "pal.png"
    Image.new("RGB", (32, 32), (128, 128, 128)).convert("P").save(pal)
    out["P"] = pal
    pal_t = tmp_path / "pal_t.png"
    Image.new("RGB", (32, 32), (128, 128, 128)).convert("P").save(pal_t, transparency=7)
    out["P+transparency"] = pal_t
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((32, 32), 128 * 257, dtype=np.uint16)).save(deep)
    out["16-bit"] = deep
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 0, 0, 127)).save(cmyk, quality=100)
    out["CMYK"] = cmyk
    return out


def test_any_mode_becomes_normalized_three_channel_tensor(tmp_path):
    tf = build_transform(DATA_CONFIG, aug(), train=False)
    for mode, path in _odd_images(tmp_path).items():
        x = tf(load_rgb(str(path)))
        assert x.shape == (3, 24, 24) and x.dtype == torch.float32, mode
        expected = (torch.tensor(128 / 255) - torch.tensor(MEAN)) / torch.tensor(STD)
        assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=0.05), (mode, x.mean(dim=(1, 2)))


def test_transparent_pixels_are_composited_on_black(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(path)
    assert np.asarray(load_rgb(str(path))).max() == 0


def test_train_transforms_and_none_augmentation(tmp_path):
    img = Image.new("RGB", (50, 40), (10, 200, 30))
    light = build_transform(DATA_CONFIG, aug(vflip=0.5), train=True)
    assert light(img).shape == (3, 24, 24)
    none = build_transform(DATA_CONFIG, aug(name="none"), train=True)
    evaluation = build_transform(DATA_CONFIG, aug(), train=False)
    assert repr(none) == repr(evaluation)
    assert "Resize(size=[27]" in repr(evaluation)  # floor(24 / 0.875) = 27 on the shorter side
    with pytest.raises(TransferError):
        build_transform(DATA_CONFIG, aug(name="heavy"), train=True)


# ---------------------------------------------------------------- sampler and loaders


def test_sampler_order_depends_on_seed_and_epoch_only():
    a, b = EpochShuffleSampler(50, seed=1), EpochShuffleSampler(50, seed=1)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(99)
    np.random.seed(5)
    assert list(b) == first and list(a) == first and sorted(first) == list(range(50))
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(EpochShuffleSampler(50, seed=2)) != first


def test_loader_drops_truncated_image_and_records_it(tiny_imagefolder, tmp_path):
    victim = tiny_imagefolder / "train" / "dog" / "img003.png"
    truncate_png(victim)
    splits = discover(cfg(root=str(tiny_imagefolder)))
    dm = make_dm(splits, tmp_path, max_bad_images=1, batch_size=4)
    dm.setup()
    assert dm.bad_images == []  # the header still reads: only decoding finds it
    batches = list(dm.loader("train", augment=False))
    assert sum(len(b.bad) for b in batches) == 1 and isinstance(batches[0], Batch)
    x, y = dm.on_before_batch_transfer(next(b for b in batches if b.bad), 0)
    assert x.shape[1:] == (3, 24, 24) and len(x) == len(y) == 7  # eval batches of 2 x 4
    assert [p for p, _ in dm.bad_images] == [str(victim)]
    assert (tmp_path / "bad.tsv").read_text().startswith(f"{victim}\t")
    dm.on_before_batch_transfer(batches[-1], 0)  # the same file again does not count twice

    strict = make_dm(splits, tmp_path / "strict", max_bad_images=0)
    with pytest.raises(TransferError, match="img003"):
        for batch in strict.loader("train", augment=True, shuffle=True):
            strict.strip_bad(batch)


def test_dataset_returns_marker_and_worker_survives(tiny_imagefolder, tmp_path):
    victim = tiny_imagefolder / "val" / "cat" / "img000.png"
    truncate_png(victim)
    ds = ImageDataset([(str(victim), 0)], build_transform(DATA_CONFIG, aug(), train=False))
    assert ds[0].path == str(victim) and "truncated" in ds[0].reason
    dm = make_dm(discover(cfg(root=str(tiny_imagefolder))), tmp_path, num_workers=1, batch_size=2)
    batches = list(dm.val_dataloader())  # eval batch size 4 through a real worker process
    assert [len(b.labels) for b in batches] == [3, 4] and batches[0].bad[0][0] == str(victim)


def test_lightning_fit_strips_bad_images_and_sets_epochs(tiny_imagefolder, tmp_path):
    import pytorch_lightning as pl

    truncate_png(tiny_imagefolder / "train" / "cat" / "img005.png")
    dm = make_dm(discover(cfg(root=str(tiny_imagefolder))), tmp_path, max_bad_images=1, batch_size=4)

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)
            self.seen = []

        def training_step(self, batch, _):
            x, y = batch  # a plain pair: the data module stripped the bad-image list
            self.seen.append(len(y))
            return torch.nn.functional.cross_entropy(self.fc(x.mean(dim=(2, 3))), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Probe()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert sum(model.seen) == 2 * 15 and len(dm.bad_images) == 1
    assert trainer.train_dataloader.sampler.epoch == 1
