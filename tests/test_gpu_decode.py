"""data.decode=gpu, exercised on the CPU: the same DeviceDecoder code runs with device='cpu' (both JPEG engines
take either), so file reading, EXIF orientation, fallbacks, bad files, the batched resample and its parameters
are checked here; the CUDA path differs only in the device string (and a side stream). Without CUDA,
data.decode=gpu falls back to the CPU workers."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from conftest import tiny_run_overrides
from transfer_cli.assembly.data import image_data
from transfer_cli.config.compose import as_schema, compose
from transfer_cli.data.augment import RandomRot90
from transfer_cli.data.gpu_decode import (
    DeviceDecoder, EncodedBatch, apply_orientation, read_encoded, resolve_decode, split_pipeline,
)
from transfer_cli.data.images import load_rgb
from transfer_cli.data.jpeg import _torchcodec, _torchvision
from transfer_cli.data.resample import plan_pipeline, resample
from transfer_cli.data.splits import DataSplits
from transfer_cli.data.transforms import build_transform
from transfer_cli.assembly.run import build_run
from transfer_cli.train import train

DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 0.875,
               "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def engines():
    """The JPEG engines this environment has: torchvision always, TorchCodec when installed (the gpu-decode extra)."""
    found = [_torchvision()]
    try:
        found.append(_torchcodec())
    except (ImportError, OSError, RuntimeError):
        pass
    return found


ENGINES = {engine.name: engine for engine in engines()}


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


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(tmp_path, orientation, engine):
    path = save_jpeg(tmp_path / "o.jpg", asymmetric_image(), orientation)
    encoded = read_encoded(path)
    assert encoded.orientation == orientation and encoded.payload.dim() == 1  # still encoded: bytes for the device
    jpeg = ENGINES[engine]
    ours = jpeg.decode([encoded.payload], torch.device("cpu"))[0]
    if not jpeg.upright:
        ours = apply_orientation(ours, encoded.orientation)
    expected = torch.from_numpy(np.asarray(load_rgb(path))).permute(2, 0, 1)  # PIL's exif_transpose
    assert ours.shape == expected.shape == (3, encoded.height, encoded.width)
    assert (ours.float() - expected.float()).abs().mean() < 3.0


def test_non_jpeg_and_cut_short_files_are_decoded_by_the_worker(tmp_path):
    img = asymmetric_image()
    img.save(tmp_path / "a.png")
    pixels, orientation, height, width = read_encoded(str(tmp_path / "a.png"))
    assert orientation == 0 and tuple(pixels.shape) == (3, 40, 60) and (height, width) == (40, 60)
    img.convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG")  # nvJPEG does not take CMYK: decoded on the CPU
    pixels, orientation, _, _ = read_encoded(str(tmp_path / "cmyk.jpg"))
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


def image_module(tmp_path, files, augmentation="none", *overrides):
    samples = [(str(p), i % 2) for i, p in enumerate(files)]
    splits = DataSplits(class_names=["a", "b"], train=samples, val=samples[:2])
    cfg = as_schema(compose(["data=imagefolder", "data.num_workers=0", "data.batch_size=8",
                             f"augmentation={augmentation}", "seed=0", *overrides]))
    return image_data(cfg, splits, DATA_CONFIG, bad_log=tmp_path / "bad_images.txt")


def decode_on(dm, device, engine=None):
    """What data.decode=gpu sets up on a CUDA machine, on any device."""
    transforms = dm.transforms
    dm.decoder = DeviceDecoder({True: transforms.train, False: transforms.eval}, transforms.image_shape, device,
                               engine=ENGINES[engine] if engine else None)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_device_decoder_matches_cpu_pipeline_and_drops_bad_files(tmp_path, engine):
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
    decode_on(dev, "cpu", engine)
    assert dev.decoder.plans[False] is not None  # resize + centre crop: batched
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
    assert all(plan is not None for plan in run.images.decoder.plans.values())  # both pipelines batched
    seen = []
    run.model.register_forward_pre_hook(lambda _, args: seen.append((args[0].dtype, tuple(args[0].shape[1:]))))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 4
    assert set(seen) == {(torch.float32, (3, 32, 32))}


# ---------------------------------------------------------------- the batched resample


def gradient_image(height, width, seed):
    """Smooth ramps with noise on top: resampling errors show, and no two pixels are alike."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ramps = torch.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx * 7 + yy * 13) % 256])
    return (ramps // 2 + torch.randint(0, 100, (3, height, width), generator=g)).to(torch.uint8)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_batched_crops_turns_and_flips_match_torchvision(interpolation):
    """Fixed parameters, images of four sizes in one batch, crops that upscale and crops that downscale up to
    6x, every quarter turn and flip: torchvision's resized_crop, rotate and flips, to rounding (its uint8 bilinear
    kernel uses fixed-point weights: now and then two 8-bit levels)."""
    sources = [gradient_image(40, 60, 0), gradient_image(90, 70, 1), gradient_image(33, 33, 2),
               gradient_image(120, 200, 3)]
    out = (24, 32)  # not square: quarter turns still give (24, 32)
    plan, others = plan_pipeline(v2.Compose([v2.RandomResizedCrop(out, interpolation=interpolation, antialias=True),
                                             v2.ToDtype(torch.float32, scale=True)]))
    assert plan is not None, others
    images, params, expected = [], [], []
    for n, image in enumerate(sources):
        for turns in range(4):
            for vflip, hflip in ((0, 0), (0, 1), (1, 0), (1, 1)):
                turned = TF.rotate(image, 90 * turns, expand=True) if turns else image
                height, width = turned.shape[-2:]
                top, left = (3 * n + turns) % (height // 3), (5 * n + 2 * turns) % (width // 3)
                h, w = height - top - n, width - left - 2 * n
                ref = TF.resized_crop(turned, top, left, h, w, list(out), interpolation=plan.interpolation,
                                      antialias=True)
                ref = TF.vertical_flip(ref) if vflip else ref
                expected.append(TF.horizontal_flip(ref) if hflip else ref)
                images.append(image)
                params.append([turns, top, h, out[0], 0, left, w, out[1], 0, vflip, hflip])
    got = resample(images, torch.tensor(params, dtype=torch.float64), plan)
    diff = (got.int() - torch.stack(expected).int()).abs()
    assert got.dtype == torch.uint8 and tuple(got.shape) == (64, 3, *out)
    assert diff.max() <= 2 and diff.float().mean() < 0.1


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_batched_eval_transform_matches_resize_and_centre_crop(interpolation):
    pipeline = v2.Compose([v2.Resize(36, interpolation=interpolation, antialias=True), v2.CenterCrop((32, 32)),
                           v2.ToDtype(torch.float32, scale=True)])
    plan, _ = plan_pipeline(pipeline)
    images = [gradient_image(h, w, i) for i, (h, w) in enumerate([(50, 70), (64, 64), (31, 45), (200, 150)])]
    params = torch.tensor([plan.draw(*image.shape[-2:]) for image in images], dtype=torch.float64)
    got = plan.tail(resample(images, params, plan))
    expected = torch.stack([pipeline(image) for image in images])
    assert (got - expected).abs().max() * 255 <= 2.0 + 1e-4


def test_drawn_parameters_are_the_v2_pipelines_own():
    """Under one seed the plan draws the turn, crop and flips the v2 pipeline draws: data.decode=gpu augments each
    image as data.decode=cpu does."""
    pipeline = v2.Compose([RandomRot90(0.75), v2.RandomResizedCrop((24, 40), scale=(0.1, 1.0), antialias=True),
                           v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5),
                           v2.ToDtype(torch.float32, scale=True)])
    plan, _ = plan_pipeline(pipeline)
    images = [gradient_image(h, w, i) for i, (h, w) in enumerate([(50, 70), (64, 64), (31, 45), (200, 150)])]
    turns = set()
    for seed in range(6):
        torch.manual_seed(seed)
        expected = torch.stack([pipeline(image) for image in images])
        torch.manual_seed(seed)
        params = torch.tensor([plan.draw(*image.shape[-2:]) for image in images], dtype=torch.float64)
        turns |= set(params[:, 0].tolist())
        diff = (plan.tail(resample(images, params, plan)) - expected).abs() * 255
        assert diff.max() <= 2.0 + 1e-4 and diff.mean() < 0.1
    assert turns == {0.0, 1.0, 2.0, 3.0}


def test_decode_gpu_crops_and_flips_each_training_image_as_decode_cpu_does(tmp_path):
    files = [save_jpeg(tmp_path / f"{i}.jpg", asymmetric_image(48 + 8 * i, 40, i)) for i in range(6)]
    batches = {}
    for decode in ("cpu", "gpu"):
        dm = image_module(tmp_path, files, "light", "augmentation.rot90=0.75", "augmentation.vflip=0.5")
        if decode == "gpu":
            decode_on(dm, "cpu")
        loader = dm.loader("train", augment=True, shuffle=True)
        loader.sampler.set_epoch(3)
        batches[decode] = dm.strip_bad(next(iter(loader)))
    (cpu_images, cpu_labels), (gpu_images, gpu_labels) = batches["cpu"], batches["gpu"]
    assert torch.equal(cpu_labels, gpu_labels)
    diff = (cpu_images - gpu_images).abs() * 0.229 * 255  # back to 8-bit levels (roughly: the std of red)
    assert diff.mean() < 0.5 and diff.max() < 8  # PIL's resampler and libjpeg vs ours: the same crops and flips


def test_decode_gpu_parameters_depend_on_the_image_and_epoch_only(tmp_path):
    """What makes data.decode=gpu resume exactly: each image's crop and flips are a function of (seed, epoch,
    image), whatever the batch size or the order it is drawn in."""
    files = [save_jpeg(tmp_path / f"{i}.jpg", asymmetric_image(48 + 8 * i, 40, i)) for i in range(8)]
    drawn = []
    for batch_size in (8, 3):
        dm = image_module(tmp_path, files, augmentation="light")
        dm.batch_size = batch_size
        decode_on(dm, "cpu")
        loader = dm.loader("train", augment=True, shuffle=True)
        loader.sampler.set_epoch(2)
        by_path = {}
        for batch in loader:
            by_path.update({path: tuple(row) for path, row in zip(batch.paths, batch.params.tolist())})
        drawn.append(by_path)
    assert drawn[0] == drawn[1] and len(drawn[0]) >= 7
    dm.loader("train", augment=True, shuffle=True).sampler.set_epoch(3)
    loader = dm.loader("train", augment=True, shuffle=True)
    loader.sampler.set_epoch(3)
    other_epoch = {path: tuple(row) for batch in loader for path, row in zip(batch.paths, batch.params.tolist())}
    assert other_epoch != drawn[0]


def test_steps_the_batched_path_does_not_do_run_image_by_image_with_their_seeds(tmp_path, caplog):
    files = [save_jpeg(tmp_path / f"{i}.jpg", asymmetric_image()) for i in range(4)]
    dm = image_module(tmp_path, files, augmentation="medium")
    decode_on(dm, "cpu")
    assert dm.decoder.plans[True] is None and dm.decoder.plans[False] is not None
    assert "ColorJitter" in dm.decoder.describe() and "image by image" in dm.decoder.describe()
    loader = dm.loader("train", augment=True, shuffle=True)
    batch = next(iter(loader))
    assert batch.params is None and len(set(batch.seeds)) == 4
    torch.manual_seed(0)
    first, _ = dm.strip_bad(batch)
    torch.manual_seed(1)  # the global RNG does not matter: each image's seed does
    again, _ = dm.strip_bad(batch)
    assert torch.equal(first, again) and tuple(first.shape) == (4, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path needs a CUDA device")
@pytest.mark.parametrize("engine", list(ENGINES))
def test_cuda_decode_and_resample_match_the_cpu_path(tmp_path, engine):
    """On a GPU: nvJPEG on a side stream, the batched resample on the device; the same images as on the CPU (two
    JPEG decoders: a few levels apart at most)."""
    files = [save_jpeg(tmp_path / f"{i}.jpg", asymmetric_image(48 + 8 * i, 40, i), orientation=1 + i) for i in range(6)]
    out = {}
    for device in ("cpu", "cuda"):
        dm = image_module(tmp_path, files, "light", "augmentation.rot90=0.75")
        decode_on(dm, device, engine)
        loader = dm.loader("train", augment=True, shuffle=True)
        loader.sampler.set_epoch(1)
        images, labels = dm.strip_bad(next(iter(loader)))
        out[device] = (images.cpu(), labels.cpu())
    assert torch.equal(out["cpu"][1], out["cuda"][1])
    diff = (out["cpu"][0] - out["cuda"][0]).abs() * 0.229 * 255
    assert diff.mean() < 1.0 and diff.max() < 16
