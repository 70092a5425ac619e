"""Augmentation presets, Mixup/CutMix, label smoothing and class weights, and `transfer augment-preview`."""

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_run_overrides, transfer
from PIL import Image
from timm.data.mixup import mixup_target

from transfer_cli.assembly.module import criterion_for
from transfer_cli.config.compose import as_schema, compose
from transfer_cli.data.augment import PRESETS
from transfer_cli.data.images import load_rgb
from transfer_cli.data.transforms import build_transform
from transfer_cli.errors import TransferError
from transfer_cli.models.backbone import create_backbone, resolve_data_config
from transfer_cli.commands.augment_preview import augment_preview, parse_args
from transfer_cli.assembly.run import build_run
from transfer_cli.train import train
from transfer_cli.training.mixing import build_mixup, mix_batch

BACKBONE = "test_efficientnet"
MEAN, STD = [0.2, 0.4, 0.6], [0.1, 0.2, 0.3]  # far from ImageNet's, so a wrong normalization shows


def model_overrides(size=24):
    return ["~experiment", f"model.backbone={BACKBONE}", "model.pretrained=false", f"data.image_size={size}",
            f"data.mean=[{','.join(map(str, MEAN))}]", f"data.std=[{','.join(map(str, STD))}]"]


def run_overrides(tmp_path, root, *overrides):
    return tiny_run_overrides(root, tmp_path / "run", *overrides, backbone=BACKBONE)


@pytest.fixture(scope="module")
def data_config():
    cfg = as_schema(compose(model_overrides()))
    return resolve_data_config(create_backbone(cfg.model), cfg.data)


@pytest.fixture
def test_images(tmp_path):
    """A grayscale PNG (loaded the way training loads it: as RGB) and a non-square RGB image, both with gradients."""
    ramp = np.linspace(0, 255, 50 * 37).reshape(37, 50).astype(np.uint8)
    Image.fromarray(ramp, mode="L").save(tmp_path / "gray.png")
    gray = load_rgb(str(tmp_path / "gray.png"))
    rgb = Image.fromarray(np.stack([ramp.T, 255 - ramp.T, np.full_like(ramp.T, 90)], axis=-1), mode="RGB")
    assert gray.mode == "RGB" and rgb.size == (37, 50)
    return {"gray": gray, "rgb": rgb}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_gives_normalized_tensor_at_input_size(preset, data_config, test_images):
    cfg = as_schema(compose([*model_overrides(), f"augmentation={preset}", "augmentation.rot90=0.75",
                             "augmentation.vflip=0.5", "augmentation.random_erasing=0.5"]))
    assert cfg.augmentation.name == preset
    train_tf = build_transform(data_config, cfg.augmentation, train=True)
    eval_tf = build_transform(data_config, cfg.augmentation, train=False)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    torch.manual_seed(0)
    for kind, img in test_images.items():
        draws = [train_tf(img) for _ in range(4)]
        for x in draws:
            assert x.shape == (3, 24, 24) and x.dtype == torch.float32, (preset, kind)
            pixels = x * std + mean  # undoing the configured normalization lands in the [0, 1] pixel range
            assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5, (preset, kind)
            assert x.min() < 0 or x.max() > 1, (preset, kind)  # ... which x itself is not in
        if preset == "none":
            assert all(torch.equal(x, eval_tf(img)) for x in draws)
        else:
            assert not all(torch.equal(x, draws[0]) for x in draws[1:]), (preset, kind)


def test_medium_preset_adds_photometric_and_geometric_changes():
    aug = as_schema(compose([*model_overrides(), "augmentation=medium"])).augmentation
    assert aug.color_jitter > 0 and aug.rotation > 0 and aug.perspective > 0 and aug.noise_std > 0
    light = as_schema(compose([*model_overrides(), "augmentation=light"])).augmentation
    assert light.color_jitter == light.rotation == light.perspective == light.noise_std == 0


def test_unknown_preset_names_the_presets():
    with pytest.raises(TransferError) as err:
        compose([*model_overrides(), "augmentation.name=heavy"])
    assert "randaugment" in err.value.fix


@pytest.mark.parametrize("rot90,expected_corners", [(0.75, 4), (0.0, 1)])
def test_rot90_turns_by_multiples_of_90_degrees(rot90, expected_corners, data_config):
    aug = as_schema(compose([*model_overrides(), "augmentation=light", f"augmentation.rot90={rot90}",
                             "augmentation.hflip=0", "augmentation.scale=[1,1]", "augmentation.ratio=[1,1]"])).augmentation
    tf = build_transform(data_config, aug, train=True)
    marked = np.zeros((16, 16, 3), dtype=np.uint8)
    marked[:4, :4] = 255  # a bright top-left corner: its position after the transform gives the rotation
    img = Image.fromarray(marked)
    torch.manual_seed(0)
    corners = set()
    for _ in range(40):
        x = tf(img)[0]
        quadrants = [x[:12, :12], x[:12, 12:], x[12:, 12:], x[12:, :12]]
        corners.add(int(np.argmax([float(q.mean()) for q in quadrants])))
    assert len(corners) == expected_corners


# ---------------------------------------------------------------- Mixup / CutMix


def aug_cfg(*overrides):
    return as_schema(compose(["~experiment", *overrides])).augmentation


def test_mixup_is_off_unless_an_alpha_is_set():
    assert build_mixup(aug_cfg(), 3) is None
    assert build_mixup(aug_cfg("augmentation.mixup_alpha=0.2", "augmentation.mix_prob=0"), 3) is None
    assert build_mixup(aug_cfg("augmentation.cutmix_alpha=1.0"), 3) is not None


@pytest.mark.parametrize("batch_size", [4, 5, 1])
@pytest.mark.parametrize("alphas", [("1.0", "0"), ("0", "1.0"), ("1.0", "1.0")])
def test_mixed_targets_are_soft_and_sum_to_one(batch_size, alphas):
    smoothing, classes = 0.1, 3
    mixup = build_mixup(aug_cfg(f"augmentation.mixup_alpha={alphas[0]}", f"augmentation.cutmix_alpha={alphas[1]}",
                                f"augmentation.label_smoothing={smoothing}"), classes)
    np.random.seed(0)
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 1, 0][:batch_size])  # every mirrored pair holds two different classes
    images = torch.rand(batch_size, 3, 8, 8)
    originals = images.clone()
    mixed, soft = mix_batch(mixup, images, labels)
    assert mixed.shape == originals.shape and soft.shape == (batch_size, classes)
    assert soft.is_floating_point()
    assert torch.allclose(soft.sum(dim=1), torch.ones(batch_size))
    floor = smoothing / classes
    assert soft.min() >= floor - 1e-6
    even = batch_size - batch_size % 2
    if even:
        assert ((soft[:even] > floor + 1e-3).sum(dim=1) == 2).all()  # two classes share each mixed row
        assert not torch.equal(mixed[:even], originals[:even])
    if even < batch_size:  # the odd one out keeps its image and its smoothed target
        assert torch.equal(mixed[-1], originals[-1])
        assert torch.allclose(soft[-1], mixup_target(labels[-1:], classes, 1.0, smoothing)[0])


# ---------------------------------------------------------------- the criterion


def test_label_smoothing_matches_torch_and_is_not_applied_twice():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    smoothed = criterion_for(as_schema(compose(["~experiment", "augmentation.label_smoothing=0.1"])), 4)
    plain = criterion_for(as_schema(compose(["~experiment"])), 4)
    assert torch.allclose(smoothed(logits, target), F.cross_entropy(logits, target, label_smoothing=0.1))
    assert torch.allclose(plain(logits, target), F.cross_entropy(logits, target))
    assert not torch.allclose(smoothed(logits, target), plain(logits, target))
    # Mixup's soft targets already hold the smoothing: an unmixed one (lam=1) gives the hard target's loss.
    soft = mixup_target(target, 4, 1.0, 0.1)
    assert torch.allclose(smoothed(logits, soft), smoothed(logits, target))


def test_class_weights_auto_weighs_classes_by_inverse_frequency():
    counts = [6, 2, 4]
    torch.manual_seed(0)
    logits, target = torch.randn(9, 3), torch.tensor([0, 0, 0, 1, 2, 2, 1, 0, 2])
    weighted = criterion_for(as_schema(compose(["~experiment", "data.class_weights=auto"])), 3, class_counts=counts)
    unweighted = criterion_for(as_schema(compose(["~experiment"])), 3, class_counts=counts)
    per_sample = F.cross_entropy(logits, target, reduction="none")
    total = sum(counts)
    w = torch.tensor([total / (3 * c) for c in counts])
    assert w[1] / w[0] == pytest.approx(counts[0] / counts[1])  # twice as rare: weighs twice as much ...
    expected = (w[target] * per_sample).sum() / w[target].sum()
    assert torch.allclose(weighted(logits, target), expected)
    assert torch.allclose(unweighted(logits, target), per_sample.mean())
    # ... and with soft targets too (mixup), where the loss is the plain batch mean of the weighted terms.
    one_hot = F.one_hot(target, 3).float()
    assert torch.allclose(weighted(logits, one_hot), (w[target] * per_sample).mean())
    with_no_counts = criterion_for(as_schema(compose(["~experiment", "data.class_weights=auto"])), 3)
    assert torch.allclose(with_no_counts(logits, target), per_sample.mean())


# ---------------------------------------------------------------- real runs


def test_training_with_mixup_cutmix_smoothing_and_class_weights_completes(tmp_path, tiny_imagefolder):
    # batch_size=7 over 16 images: two odd batches (one image left unmixed in each) and an even one.
    cfg = compose(run_overrides(
        tmp_path, tiny_imagefolder, "transfer=fine_tune", "augmentation=medium", "augmentation.mixup_alpha=0.4",
        "augmentation.cutmix_alpha=1.0", "augmentation.label_smoothing=0.1", "data.class_weights=auto",
        "data.batch_size=7", "trainer.max_epochs=1"))
    summary = train(cfg)
    assert summary["epochs"] == 1 and summary["feature_cache"] is False
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    epoch_rows = [r for r in rows if r.get("train/loss_epoch")]
    assert len(epoch_rows) == 1 and math.isfinite(float(epoch_rows[0]["train/loss_epoch"]))
    assert 0.0 <= float(epoch_rows[0]["train/acc"]) <= 1.0  # scored against the dominant label of each mix


def test_mixup_applies_to_images_only(tmp_path, tiny_imagefolder):
    mixing = ["augmentation.mixup_alpha=0.4", "trainer.max_epochs=1"]
    cached = build_run(compose(run_overrides(tmp_path, tiny_imagefolder, "transfer=feature_extract",
                                             "augmentation=none", *mixing)), tmp_path / "a")
    assert cached.feature_cache and cached.module.mixup is None
    images = build_run(compose(run_overrides(tmp_path, tiny_imagefolder, "transfer=fine_tune", *mixing)),
                       tmp_path / "b")
    assert not images.feature_cache and images.module.mixup is not None


# ---------------------------------------------------------------- augment-preview


def test_augment_preview_writes_a_png_grid(tmp_path, tiny_imagefolder):
    output = tmp_path / "out" / "preview.png"
    args = run_overrides(tmp_path, tiny_imagefolder, "augmentation=medium", "augmentation.cutmix_alpha=1.0")
    assert augment_preview([*args, "n=5", f"output={output}"]) == output
    with Image.open(output) as img:
        assert img.format == "PNG"
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape[1] > pixels.shape[0]  # 5 pairs: 4 per row, so 8 images across and 2 rows
    assert pixels.std() > 10  # images, not a blank canvas


@pytest.mark.parametrize("arg", ["n=0", "n=many", "output="])
def test_augment_preview_rejects_bad_arguments(arg):
    with pytest.raises(TransferError):
        parse_args([arg])


def test_augment_preview_cli_fails_fast_on_a_config_mistake():
    out = transfer("augment-preview", "augmentation=medum", "n=4", probe=True, timeout=120)
    assert out.returncode == 2 and "medium" in out.stderr and "HEAVY []" in out.stderr


@pytest.mark.slow
def test_augment_preview_cli_writes_the_file(tmp_path, tiny_imagefolder):
    output = tmp_path / "cli.png"
    out = transfer("augment-preview", *run_overrides(tmp_path, tiny_imagefolder), "n=2", f"output={output}",
                   timeout=300)
    assert out.returncode == 0, out.stderr
    assert output.is_file() and str(output) in out.stdout
