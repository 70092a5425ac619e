"""data.decode=gpu, exercised on the CPU: the same DeviceDecoder code runs with device='cpu' (torchvision's
decode_jpeg takes either), so file reading, EXIF orientation, fallbacks, bad files and the batched transforms
are checked here; the CUDA path differs only in the device string. Without CUDA, data.decode=gpu falls back."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from conftest import tiny_run_overrides
from transfer_cli.assembly.data import image_data
from transfer_cli.config.compose import as_schema, compose
from transfer_cli.data.gpu_decode import (
    DeviceDecoder, EncodedBatch, apply_orientation, read_encoded, resolve_decode, split_pipeline,
)
from transfer_cli.data.images import load_rgb
from transfer_cli.data.splits import DataSplits
from transfer_cli.data.transforms import build_transform
from transfer_cli.assembly.run import build_run
from transfer_cli.train import train

DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 0.875,
               "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def asymmetric_image(w=60, h=40, seed=0):
    """Smooth, with one bright corner: any wrong flip or turn moves it far from where it should be."""
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 4, yy * 6, (xx + yy) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    arr[: h // 3, : w // 4] = 255
    return Image.fromarray(arr, "RGB")


def save_jpeg(path, img, orientation=None):
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return str(path)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(tmp_path, orientation):
    path = save_jpeg(tmp_path / "o.jpg", asymmetric_image(), orientation)
    payload, found = read_encoded(path)
    assert found == orientation and payload.dim() == 1  # still encoded: bytes for the device decoder
    from torchvision.io import ImageReadMode, decode_jpeg

    ours = apply_orientation(decode_jpeg(payload, mode=ImageReadMode.RGB), found)
    expected = torch.from_numpy(np.asarray(load_rgb(path))).permute(2, 0, 1)  # PIL's exif_transpose
    assert ours.shape == expected.shape
    assert (ours.float() - expected.float()).abs().mean() < 3.0


def test_non_jpeg_and_cut_short_files_are_decoded_by_the_worker(tmp_path):
    img = asymmetric_image()
    img.save(tmp_path / "a.png")
    pixels, orientation = read_encoded(str(tmp_path / "a.png"))
    assert orientation == 0 and tuple(pixels.shape) == (3, 40, 60)
    img.convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG")  # nvJPEG does not take CMYK: decoded on the CPU
    pixels, orientation = read_encoded(str(tmp_path / "cmyk.jpg"))
    assert orientation == 0 and pixels.shape[0] == 3
    full = (tmp_path / "b.jpg")
    save_jpeg(full, img)
    (tmp_path / "cut.jpg").write_bytes(full.read_bytes()[:-200])
    with pytest.raises(OSError):  # PIL refuses a truncated file, as with data.decode=cpu
        read_encoded(str(tmp_path / "cut.jpg"))


def test_split_pipeline_batches_only_the_per_pixel_tail():
    aug = as_schema(compose(["augmentation=light"])).augmentation
    per_image, per_batch = split_pipeline(build_transform(DATA_CONFIG, aug, train=True))
    assert [type(t) for t in per_batch.transforms] == [v2.ToImage, v2.ToDtype, v2.Normalize]
    assert v2.RandomHorizontalFlip in [type(t) for t in per_image.transforms]  # per-sample randomness kept


def image_module(tmp_path, files, augmentation="none"):
    samples = [(str(p), i % 2) for i, p in enumerate(files)]
    splits = DataSplits(class_names=["a", "b"], train=samples, val=samples[:2])
    cfg = as_schema(compose(["data=imagefolder", "data.num_workers=0", "data.batch_size=8",
                             f"augmentation={augmentation}", "seed=0"]))
    return image_data(cfg, splits, DATA_CONFIG, bad_log=tmp_path / "bad_images.txt")


def decode_on(dm, device):
    """What data.decode=gpu sets up on a CUDA machine, on any device."""
    dm.decoder = DeviceDecoder.for_transforms(dm.transforms, device)


def test_device_decoder_matches_cpu_pipeline_and_drops_bad_files(tmp_path):
    files = []
    for i in range(4):
        files.append(save_jpeg(tmp_path / f"{i}.jpg", asymmetric_image(50 + 10 * i, 40, i), orientation=1 + 2 * i))
    asymmetric_image().save(tmp_path / "p.png")
    files.append(str(tmp_path / "p.png"))
    good_bytes = (tmp_path / "0.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good_bytes[:-300])
    files.append(str(tmp_path / "cut.jpg"))

    cpu = image_module(tmp_path, files)
    ref_images, ref_labels = cpu.strip_bad(next(iter(cpu.loader("train", augment=False))))
    dev = image_module(tmp_path, files)
    decode_on(dev, "cpu")
    batch = next(iter(dev.loader("train", augment=False)))
    assert isinstance(batch, EncodedBatch)
    images, labels = dev.strip_bad(batch)
    assert images.dtype == torch.float32 and tuple(images.shape) == (5, 3, 32, 32)
    assert torch.equal(labels, ref_labels)
    assert torch.allclose(images, ref_images, atol=0.25)  # two resize implementations, same picture
    assert (images - ref_images).abs().mean() < 0.05
    assert [p for p, _ in dev.bad_images] == [str(tmp_path / "cut.jpg")]
    assert "cut.jpg" in (tmp_path / "bad_images.txt").read_text()


def test_device_decoder_augments_each_image_on_its_own(tmp_path):
    files = [save_jpeg(tmp_path / f"{i}.jpg", asymmetric_image()) for i in range(8)]  # eight equal images
    dm = image_module(tmp_path, files, augmentation="light")
    decode_on(dm, "cpu")
    torch.manual_seed(0)
    images, _ = dm.strip_bad(next(iter(dm.loader("train", augment=True))))
    assert tuple(images.shape) == (8, 3, 32, 32)
    distinct = {tuple(img.flatten()[:50].tolist()) for img in images}
    assert len(distinct) > 1, "every image got the same crop: the augmentation ran once for the batch"


def test_decode_gpu_without_cuda_falls_back_with_a_message(tmp_path, tiny_imagefolder, caplog):
    assert resolve_decode("cpu", torch.device("cuda")) is None
    with caplog.at_level(logging.WARNING, logger="transfer_cli"):
        assert resolve_decode("gpu", torch.device("cpu")) is None
    assert "data.decode=gpu needs a CUDA device" in caplog.text

    cfg = compose(tiny_run_overrides(tiny_imagefolder, tmp_path / "run", "trainer.max_epochs=1", "transfer=fine_tune",
                                     "data.decode=gpu"))
    summary = train(cfg)
    assert summary["val_acc"] is not None


def test_lightning_fit_with_device_decoding(tmp_path, tiny_imagefolder):
    """The Trainer path: batches stay encoded through the workers, on_before_batch_transfer decodes them."""
    cfg = compose(tiny_run_overrides(tiny_imagefolder, tmp_path / "run", "trainer.max_epochs=1", "transfer=fine_tune",
                                     "augmentation=light", backbone="test_resnet"))
    (tmp_path / "run").mkdir()
    run = build_run(cfg, tmp_path / "run")
    decode_on(run.images, torch.device("cpu"))
    seen = []
    run.model.register_forward_pre_hook(lambda _, args: seen.append((args[0].dtype, tuple(args[0].shape[1:]))))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 4
    assert set(seen) == {(torch.float32, (3, 32, 32))}
