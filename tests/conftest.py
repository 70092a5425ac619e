"""Shared fixtures and helpers: tiny, clearly separable image data sets written to pytest's tmp_path, the CLI
in a subprocess, a built run, a checkpoint read back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from PIL import Image

# The CLI in a fresh interpreter that reports, on stderr, which heavy modules it imported ("HEAVY [...]").
PROBE = ("import sys; from transfer_cli.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
         "    print('HEAVY', sorted(m for m in ('torch', 'pytorch_lightning', 'timm') if m in sys.modules), "
         "file=sys.stderr)")


def transfer(*args: str, cwd=None, env=None, timeout: float = 600, probe: bool = False) -> subprocess.CompletedProcess:
    """`transfer <args>` in a subprocess, output captured as text; probe=True: through PROBE."""
    code = ["-c", PROBE] if probe else ["-m", "transfer_cli"]
    return subprocess.run([sys.executable, *code, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def transfer_popen(*args: str, cwd=None) -> subprocess.Popen:
    """`transfer <args>` started, unbuffered, stdout and stderr merged: for tests that signal or kill it."""
    return subprocess.Popen([sys.executable, "-m", "transfer_cli", *args], cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def make_run(cfg, run_dir: Path):
    """The built run (assembly/run.py build_run) of `cfg` in `run_dir`, created first as train() does."""
    from transfer_cli.assembly.run import build_run

    run_dir.mkdir(parents=True, exist_ok=True)
    return build_run(cfg, run_dir)


def load_ckpt(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


# Class k's look: 0 dark noise, 1 bright noise, then strongly coloured noise, so a few SGD steps on a tiny
# model (or a linear probe on random features) separate them.
_TINTS = [(30, 30, 30), (225, 225, 225), (220, 40, 40), (40, 200, 40), (40, 60, 220), (220, 200, 40)]


def class_image(k: int, size: int, rng: np.random.Generator) -> Image.Image:
    base = np.array(_TINTS[k % len(_TINTS)], dtype=np.int16)
    noise = rng.integers(-25, 26, size=(size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), mode="RGB")


def write_class_images(folder: Path, k: int, n: int, size: int, rng: np.random.Generator, prefix: str = "img"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        class_image(k, size, rng).save(folder / f"{prefix}{i:03d}.png")


def tiny_run_overrides(root, run_dir=None, *extra: str, backbone: str = "test_efficientnet") -> list[str]:
    """The overrides every tiny training run starts from: `root`'s ImageFolder, a random-init tiny timm model at
    32 px, CPU, batch 4, no workers, no progress output; the run in `run_dir` (None: Hydra's own run dir)."""
    return ["~experiment", "data=imagefolder", f"data.root={root}", f"model.backbone={backbone}",
            "model.pretrained=false", "trainer=cpu", "data.batch_size=4", "data.num_workers=0",
            "data.image_size=32", "callbacks.rich_progress=false", "trainer.enable_progress_bar=false",
            *([f"paths.output_dir={run_dir}"] if run_dir is not None else []), *extra]


def tiny_cfg(tmp_path, root, *overrides: str, run: str = "run", backbone: str = "test_efficientnet"):
    """The composed config of a tiny run (tiny_run_overrides) in `tmp_path / run`, plus `overrides`."""
    from transfer_cli.config.compose import compose

    return compose(tiny_run_overrides(root, tmp_path / run, *overrides, backbone=backbone))


def _make_image_folder(
    root: Path,
    classes: Sequence[str] = ("cat", "dog"),
    per_class: int = 8,
    size: int = 32,
    layout: str = "split",
    bad: int = 0,
) -> Path:
    """layout="split": root/train/<class>/ (per_class images) and root/val/<class>/ (per_class // 2, >= 1);
    layout="flat": root/<class>/ (per_class images). `bad` files of garbage bytes named *.png go into the
    first class's (train) folder. Returns root."""
    root = Path(root)
    rng = np.random.default_rng(1234)
    if layout == "split":
        for k, c in enumerate(classes):
            write_class_images(root / "train" / c, k, per_class, size, rng)
            write_class_images(root / "val" / c, k, max(1, per_class // 2), size, rng)
        bad_dir = root / "train" / classes[0]
    elif layout == "flat":
        for k, c in enumerate(classes):
            write_class_images(root / c, k, per_class, size, rng)
        bad_dir = root / classes[0]
    else:
        raise ValueError(f"layout must be split or flat, got {layout!r}")
    for i in range(bad):
        (bad_dir / f"corrupt{i:03d}.png").write_bytes(b"this is not an image " * (i + 1))
    return root


@pytest.fixture
def make_image_folder():
    """Factory: make_image_folder(root, classes=("cat", "dog"), per_class=8, size=32, layout="split", bad=0)."""
    return _make_image_folder


@pytest.fixture
def tiny_imagefolder(tmp_path) -> Path:
    """root/{train,val}/{cat,dog}/*.png: 8 train and 4 val images per class, 32x32."""
    return _make_image_folder(tmp_path / "tiny")


@pytest.fixture(autouse=True)
def private_feature_cache(tmp_path, monkeypatch):
    """Each test caches backbone features under its own tmp_path, never in the user's ~/.cache."""
    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(tmp_path / "feature-cache"))
