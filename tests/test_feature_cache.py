"""The on-disk feature cache of frozen backbones: same training result, hits without a backbone pass,
invalidation by the fingerprint, damaged entries rebuilt, augmented views."""

import logging
import os

import numpy as np
import pytest
import timm
import torch
from conftest import class_image, tiny_cfg

from transfer_cli import seeding
from transfer_cli.assembly.data import cache_plan
from transfer_cli.assembly.run import build_run
from transfer_cli.atomic import leftover_temp_files
from transfer_cli.config.compose import as_schema, compose
from transfer_cli.data.feature_store import FeatureStore, files_digest, weights_digest
from transfer_cli.data.images import ImageDataset
from transfer_cli.data.samplers import EpochViewSampler, train_sampler
from transfer_cli.data.seeded import SeededItems
from transfer_cli.data.transforms import build_transform
from transfer_cli.train import train

BACKBONE = "test_efficientnet"


# Cached features of a frozen backbone; the cache is the test's own (conftest: TRANSFER_CACHE_DIR in tmp_path).
# The epoch loop on cached features (the converged probe, transfer.head_solver=lbfgs, is tests/test_probe_runs.py)
CACHED = ("trainer.max_epochs=2", "transfer=feature_extract", "augmentation=none", "optimizer.lr=0.02",
          "transfer.head_solver=sgd")


def head_weights(summary):
    ckpt = torch.load(summary["last_checkpoint"], map_location="cpu", weights_only=True)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.head.")}


def cache_dir(tmp_path):
    return tmp_path / "feature-cache" / "features"


def cache_files(tmp_path):
    return {p.name: p.stat().st_mtime_ns for p in cache_dir(tmp_path).glob("*.pt")}


def fit_counting_backbone_calls(cfg, run_dir):
    """fit() through build_run, with a hook on the backbone: (the pre-pass's features, how many batches went
    through the backbone)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run = build_run(cfg, run_dir)
    calls = []
    run.model.backbone.register_forward_hook(lambda *_: calls.append(1))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return run.features, len(calls)


def test_head_matches_with_and_without_cache(tmp_path, tiny_imagefolder):
    cached = train(tiny_cfg(tmp_path, tiny_imagefolder, *CACHED, "transfer.cache_features=true", run="cached"))
    direct = train(tiny_cfg(tmp_path, tiny_imagefolder, *CACHED, "transfer.cache_features=false", run="direct"))
    assert cached["feature_cache"] is True and direct["feature_cache"] is False
    a, b = head_weights(cached), head_weights(direct)
    assert set(a) == set(b) and a
    start = head_weights(train(tiny_cfg(tmp_path, tiny_imagefolder, *CACHED, "trainer.max_epochs=1", run="short")))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name
        assert not torch.allclose(a[name], start[name], atol=1e-5), f"{name} did not train, the test proves nothing"
    assert cached["val_acc"] == pytest.approx(direct["val_acc"])


def test_second_run_reads_the_cache_without_a_backbone_pass(tmp_path, tiny_imagefolder, caplog):
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *CACHED)
    first, first_calls = fit_counting_backbone_calls(cfg, tmp_path / "run1")
    assert (first.misses, first.hits) == (2, 0) and first_calls > 0  # train and val computed
    written = cache_files(tmp_path)
    assert len(written) == 2

    with caplog.at_level(logging.INFO, logger="transfer_cli"):
        second, second_calls = fit_counting_backbone_calls(cfg, tmp_path / "run2")
    assert (second.misses, second.hits) == (0, 2)
    assert second_calls == 0, "a cache hit must not run the backbone"
    assert "feature cache hit: train (16 images)" in caplog.text
    assert cache_files(tmp_path) == written  # nothing rewritten
    for split in ("train", "val"):
        assert torch.equal(first.tensors[split].tensors[0], second.tensors[split].tensors[0])


def test_touched_image_recomputes_only_its_split(tmp_path, tiny_imagefolder):
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *CACHED, "trainer.max_epochs=1")
    fit_counting_backbone_calls(cfg, tmp_path / "run1")
    before = cache_files(tmp_path)
    image = next((tiny_imagefolder / "train" / "cat").glob("*.png"))
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, newer mtime

    dm, calls = fit_counting_backbone_calls(cfg, tmp_path / "run2")
    assert (dm.misses, dm.hits) == (1, 1) and calls > 0
    after = cache_files(tmp_path)
    new = set(after) - set(before)
    assert len(new) == 1 and next(iter(new)).startswith("train-")


def test_image_rewritten_with_the_same_size_and_mtime_is_recomputed(tmp_path, tiny_imagefolder):
    """The hostile battery's case 5 (tests/test_battery.py): an image's pixels replaced in place, its size and
    mtime put back (os.utime, as `touch -r` or `cp -p` would). The key holds the ctime, which any such write sets
    to the present; the bytes are not hashed (that would read the whole data set on every run)."""
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *CACHED, "trainer.max_epochs=1")
    first, _ = fit_counting_backbone_calls(cfg, tmp_path / "run1")
    image = sorted((tiny_imagefolder / "train" / "cat").glob("*.png"))[0]
    st = image.stat()
    rng = np.random.default_rng(7)
    for _ in range(100):  # PNG sizes vary with the pixels: draw a dog-coloured image of exactly the same size
        candidate = tmp_path / "candidate.png"
        class_image(1, 32, rng).save(candidate)
        if candidate.stat().st_size == st.st_size:
            break
    else:
        pytest.skip("no same-size replacement drawn")
    image.write_bytes(candidate.read_bytes())
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    second, calls = fit_counting_backbone_calls(cfg, tmp_path / "run2")
    assert (second.misses, second.hits) == (1, 1) and calls > 0  # train recomputed, val read back
    assert not torch.equal(first.tensors["train"].tensors[0], second.tensors["train"].tensors[0])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "tampered", "wrong_rows"])
def test_damaged_cache_file_is_rebuilt_with_a_warning(tmp_path, tiny_imagefolder, caplog, damage):
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *CACHED, "trainer.max_epochs=1")
    fit_counting_backbone_calls(cfg, tmp_path / "run1")
    train_file = next(cache_dir(tmp_path).glob("train-*.pt"))
    good = torch.load(train_file, weights_only=True)
    if damage == "truncated":  # an interrupted copy
        train_file.write_bytes(train_file.read_bytes()[: train_file.stat().st_size // 2])
    elif damage == "garbage":
        train_file.write_bytes(b"not a torch file")
    elif damage == "tampered":  # whole file, wrong numbers
        torch.save({**good, "features": good["features"] + 1.0}, train_file)
    else:  # a partial entry that claims to be whole
        torch.save({**good, "features": good["features"][:-1], "labels": good["labels"][:-1]}, train_file)

    with caplog.at_level(logging.WARNING, logger="transfer_cli"):
        dm, calls = fit_counting_backbone_calls(cfg, tmp_path / "run2")
    assert f"feature cache file {train_file}" in caplog.text and "recomputing" in caplog.text
    assert (dm.misses, dm.hits) == (1, 1) and calls > 0
    rebuilt = torch.load(train_file, weights_only=True)
    assert torch.allclose(rebuilt["features"], good["features"], atol=1e-6)
    assert rebuilt["checksum"] == good["checksum"]


def test_unwritable_cache_dir_keeps_features_in_memory(tmp_path, tiny_imagefolder, caplog):
    blocker = cache_dir(tmp_path)
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the cache dir should be")
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *CACHED, "trainer.max_epochs=1")
    with caplog.at_level(logging.WARNING, logger="transfer_cli"):
        summary = train(cfg)
    assert summary["feature_cache"] is True and summary["val_acc"] is not None
    assert "could not write the feature cache" in caplog.text


def test_cache_dir_null_stores_nothing(tmp_path, tiny_imagefolder):
    summary = train(tiny_cfg(tmp_path, tiny_imagefolder, *CACHED, "trainer.max_epochs=1",
                             "transfer.cache_dir=null"))
    assert summary["feature_cache"] is True
    assert not cache_dir(tmp_path).exists()


def test_fingerprint_inputs_react_to_what_changes_features(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(BACKBONE, pretrained=False, num_classes=0)
    digest = weights_digest(model)
    assert weights_digest(model) == digest
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert weights_digest(model) != digest
    changed = weights_digest(model)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean[0] += 1.0  # a buffer, not a parameter: still changes the features
    assert weights_digest(model) != changed

    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    rows = files_digest([(str(image), 0)])
    assert files_digest([(str(image), 1)]) != rows  # relabelled
    image.write_bytes(b"xy")
    assert files_digest([(str(image), 0)]) != rows  # rewritten


def test_store_round_trip_and_key_check(tmp_path):
    from transfer_cli.data.feature_store import CachedSplit

    store = FeatureStore(tmp_path / "store")
    entry = CachedSplit(torch.randn(3, 5), torch.tensor([0, 1, 0]), [("/x/bad.png", "OSError: truncated")])
    path = store.save("train-abc", entry)
    assert path is not None and not leftover_temp_files(path.parent)  # the temp file was renamed away
    loaded = store.load("train-abc", num_samples=4, width=5)
    assert torch.equal(loaded.features, entry.features) and loaded.bad == entry.bad
    assert store.load("train-abc", num_samples=5, width=5) is None  # a count that does not add up
    os.replace(path, path.with_name("train-xyz.pt"))  # an entry under someone else's key
    assert store.load("train-xyz", num_samples=4, width=5) is None


def test_cached_views_train_on_view_e_mod_k(tmp_path, tiny_imagefolder):
    cfg = tiny_cfg(tmp_path, tiny_imagefolder, *CACHED, "augmentation=light", "transfer.cache_views=2",
                   "trainer.max_epochs=3")
    assert cache_plan(as_schema(cfg))[0]
    assert not cache_plan(as_schema(tiny_cfg(tmp_path, tiny_imagefolder, *CACHED, "augmentation=light")))[0]
    dm, calls = fit_counting_backbone_calls(cfg, tmp_path / "run1")
    assert (dm.misses, dm.hits) == (3, 0) and calls > 0
    names = sorted(cache_files(tmp_path))
    assert [n.split("-")[0] + "-" + n.split("-")[1] for n in names if n.startswith("train")] == [
        "train-view0", "train-view1"]
    x = dm.tensors["train"].tensors[0]
    n = dm.train_rows
    assert x.shape[0] == 2 * n and not torch.allclose(x[:n], x[n:]), "the two views should differ"

    run = build_run(cfg, tmp_path / "run1")
    run.datamodule.features = dm
    loader = run.datamodule.train_dataloader()
    sampler = loader.sampler
    for epoch, view in [(0, 0), (1, 1), (2, 0)]:
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert sorted(i - view * n for i in indices) == list(range(n))

    again, calls = fit_counting_backbone_calls(cfg, tmp_path / "run2")
    assert (again.misses, again.hits) == (0, 3) and calls == 0
    assert torch.equal(again.tensors["train"].tensors[0], x)


def test_seeded_view_is_reproducible_and_leaves_global_rng_alone(tmp_path):
    paths = []
    rng = np.random.default_rng(0)
    for i in range(3):
        p = tmp_path / f"{i}.png"
        class_image(i, 48, rng).save(p)
        paths.append((str(p), i))
    aug = as_schema(compose(["augmentation=light"])).augmentation
    data_config = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0,
                   "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    dataset = ImageDataset(paths, build_transform(data_config, aug, train=True))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    def view(k):
        return SeededItems(dataset, 7, seeding.VIEW, prefix=(k,))

    a = [view(0)[i][0] for i in range(3)]
    assert torch.equal(torch.get_rng_state(), state)
    b = [view(0)[i][0] for i in reversed(range(3))][::-1]  # order does not matter
    c = [view(1)[i][0] for i in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))


def test_view_sampler_wraps_the_configured_sampler():
    labels = [0] * 6 + [1] * 2
    balanced = EpochViewSampler(train_sampler("balanced", labels, seed=3), num_rows=8, views=3)
    balanced.set_epoch(4)  # view 1
    drawn = list(balanced)
    assert len(drawn) == 8 and all(8 <= i < 16 for i in drawn)
