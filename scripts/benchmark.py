#!/usr/bin/env python
"""Throughput of transfer's training paths next to hand-written baselines, in one process; prints a table and
writes JSON. A benchmark, not a test: the numbers depend on the machine.

  (a) img/s of a minimal PyTorch loop vs transfer's LightningModule in its Trainer (progress bar and CSV
      logging on, as in a real run), on synthetic batches already on the device -> ratio
  (b) the same with torch.compile (trainer.compile=true) -> speed-up over eager
  (c) a feature-extraction run of --cache-epochs epochs with the feature cache vs recomputing the backbone
      every epoch -> wall-time ratio (cold cache: the one backbone pass is included)
  (d) data pipeline img/s: CPU decode with N workers vs device decode (data.decode=gpu), and end-to-end
      fine-tuning img/s on a generated JPEG folder vs the synthetic-data ceiling of (a)
  (e) a real recipe (--experiment, default elpv_best, on its own images): the first-step latency (network built
      to first optimizer step done), the first epoch, steady img/s, and the same model, batch and optimizer in
      a raw loop on a batch already on the device -> ratio
  (h) host (CPU) time per training step, the tool vs the raw loop, on a tiny model whose compute is small:
      the tool's per-step Python, visible without a GPU
  (p) the demo's head on its cached features (--probe-experiment, default demo; the backbone pass is cached in
      --work-dir, so a second run is warm): the converged probe's fit time (transfer.head_solver=lbfgs) and
      the epoch loop's epochs/s (transfer.head_solver=sgd, epochs 2..N: validation and checkpoints included)
  (g) CUDA only: scripts/gpu_check.py, the checks only a GPU answers (cuDNN autotuning per batch shape, host
      syncs per step, foreach vs fused vs CUDA graphs, torchvision vs TorchCodec decode), its output kept

  python scripts/benchmark.py --device cuda --out b.json          # every section: resnet50 b256 bf16 for a-d
  python scripts/benchmark.py --device cpu --tiny --out b.json    # a smoke run in about a minute

Each section prints its target next to its value (the summary table at the end); all go into one JSON.
Targets (H100/H200, resnet50, batch 256, bf16): (a) >= 0.98, (b) >= 1.35x, (c) >= 6x (issue 15: >= 10x cold),
(d) >= 0.9x, (e) first step <= 5 s and >= 0.8x the raw loop, (h) >= 0.9; (p, issue 16, a 2-core CPU) fit <= 2 s,
sgd >= 20 epochs/s.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import pytorch_lightning as pl
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.callbacks import Callback

from transfer_cli.config.compose import compose
from transfer_cli.assembly.model import compile_mode
from transfer_cli.assembly.run import build_run
from transfer_cli.data.gpu_decode import DeviceDecoder
from transfer_cli.data.jpeg import jpeg_engine
from transfer_cli.run_dir import fresh_dir
from transfer_cli.train import train

TARGETS = {"a_eager": 0.98, "b_compile": 1.35, "c_feature_cache": 10.0, "d_data": 0.9, "h_host": 0.9,
           "e_recipe": 0.8, "e_first_step_s": 5.0, "p_fit_s": 2.0, "p_sgd_epochs_s": 20.0}
# (section, the key holding its headline value, the key of its target, True when higher is better)
HEADLINES = [("a_eager", "ratio", "a_eager", True), ("b_compile", "speedup_vs_eager", "b_compile", True),
             ("c_feature_cache", "ratio", "c_feature_cache", True), ("d_data", "ratio", "d_data", True),
             ("e_recipe", "first_step_latency_s", "e_first_step_s", False), ("e_recipe", "ratio", "e_recipe", True),
             ("h_host", "ratio", "h_host", True), ("p_probe", "fit_s", "p_fit_s", False),
             ("p_probe", "sgd_epochs_per_s", "p_sgd_epochs_s", True)]
CUDA_DEFAULTS = dict(model="resnet50", image_size=224, batch_size=256, precision="bf16-mixed", warmup=10, steps=50,
                     images=8192, source_size=(500, 375), workers="auto", cache_epochs=10,
                     sections="a,b,c,d,e,h,g", threads=0, recipe_steps=0, recipe_overrides="")
TINY_DEFAULTS = dict(model="test_resnet", image_size=32, batch_size=8, precision="32-true", warmup=2, steps=4,
                     images=48, source_size=(64, 48), workers=0, cache_epochs=10, sections="a,c,d,e,h", threads=1,
                     recipe_steps=6, recipe_overrides="data.image_size=64 data.num_workers=0")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny-model defaults (default with --device cpu)")
    p.add_argument("--model", help="timm backbone (random init: throughput does not depend on the weights)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--precision", help="trainer.precision: 32-true | bf16-mixed | 16-mixed")
    p.add_argument("--warmup", type=int, help="untimed steps first (compilation, cuDNN autotuning, workers)")
    p.add_argument("--steps", type=int, help="timed steps of (a) and (b)")
    p.add_argument("--images", type=int, help="JPEGs in the generated folder of (c) and (d)")
    p.add_argument("--source-size", type=lambda v: tuple(int(x) for x in v.lower().split("x")),
                   help="width x height of the generated JPEGs, e.g. 500x375")
    p.add_argument("--workers", help="data.num_workers for (c) and (d): a number or auto")
    p.add_argument("--cache-epochs", type=int, help="epochs of the feature-extraction runs of (c)")
    p.add_argument("--sections", help="which of a,b,c,d,e,h,p,g to run (b compiles: minutes on a CPU)")
    p.add_argument("--host-steps", type=int, default=100, help="timed steps of (h), the host work per step")
    p.add_argument("--experiment", default="elpv_best", help="the recipe of (e): any experiment= name")
    p.add_argument("--recipe-steps", type=int, help="(e): training steps (0: one full epoch)")
    p.add_argument("--recipe-overrides", help="(e): extra overrides, space separated (the tiny run shrinks images)")
    p.add_argument("--probe-experiment", default="demo", help="(p): the experiment whose head is fitted")
    p.add_argument("--probe-epochs", type=int, default=30, help="(p): epochs of the sgd epoch loop")
    p.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default); the tiny run uses 1, "
                   "since on a small shared machine oversubscribed OpenMP threads make every number noise")
    p.add_argument("--work-dir", help="where the JPEG folder, caches and run dirs go (default: a temp dir)")
    p.add_argument("--out", default="benchmark.json", help="the JSON results")
    args = p.parse_args(argv)
    defaults = TINY_DEFAULTS if (args.tiny or args.device == "cpu") else CUDA_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu for a smoke run)")
    args.sections = [s.strip() for s in str(args.sections).split(",") if s.strip()]
    if args.device != "cuda" and "g" in args.sections:
        args.sections.remove("g")
    return args


# ---------------------------------------------------------------- data and configs


def _write_jpeg(job: tuple) -> None:
    path, seed, size = job
    rng = np.random.default_rng(seed)
    # Smooth colour fields with a little grain compress like photos (tens of KB), unlike pure noise.
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB").resize(size, Image.BICUBIC)
    arr = np.asarray(small, dtype=np.int16) + rng.integers(-8, 9, (size[1], size[0], 3), dtype=np.int16)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB").save(path, "JPEG", quality=90)


def make_jpeg_folder(root: Path, count: int, size: tuple, classes: int = 4) -> Path:
    jobs = []
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / f"{i:06d}.jpg"), i, tuple(size)))
    if count >= 256:
        with Pool(min(16, os.cpu_count() or 1)) as pool:
            pool.map(_write_jpeg, jobs, chunksize=64)
    else:
        for job in jobs:
            _write_jpeg(job)
    return root


def run_cfg(args: argparse.Namespace, root: Path, run_dir: Path, *overrides: str) -> Any:
    """transfer's config for this benchmark, as `transfer train` would compose it."""
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    return compose([
        "~experiment", "data=imagefolder", f"data.root={root}", f"model.backbone={args.model}",
        "model.pretrained=false", f"trainer.accelerator={accelerator}", "trainer.devices=1",
        f"trainer.precision={args.precision}", f"data.batch_size={args.batch_size}",
        f"data.image_size={args.image_size}", f"data.num_workers={args.workers}", "data.val_fraction=0.1",
        "logger=csv", "callbacks.rich_progress=true", "trainer.enable_progress_bar=true",
        "trainer.num_sanity_val_steps=0", f"paths.output_dir={run_dir}", *overrides,
    ])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free the previous measurement's trainer, optimizer state and activations before the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class SyntheticBatches:
    """`length` batches of one fixed (images, labels) pair, already on the device: no data cost at all."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, length: int):
        self.images, self.labels, self.length = images, labels, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return iter([(self.images, self.labels)] * self.length)


class StepTimer(Callback):
    """img/s of the training batches after the first `warmup` of the first epoch (GPU work included), and the
    host CPU time per step over the same steps."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.start: Optional[float] = None
        self.cpu_start = 0.0
        self.elapsed = 0.0
        self.cpu = 0.0
        self.images = 0
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()
            self.cpu_start = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is None or trainer.current_epoch != 0:
            return
        self.images += len(batch[1])
        self.steps += 1
        if batch_idx == trainer.num_training_batches - 1:
            sync(self.device)
            self.elapsed = time.perf_counter() - self.start
            self.cpu = time.process_time() - self.cpu_start

    @property
    def img_s(self) -> Optional[float]:
        return self.images / self.elapsed if self.elapsed > 0 else None


# ---------------------------------------------------------------- (a) and (b): training-loop overhead


def raw_loop_img_s(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, args, device, precision=None,
                   freeze=None, label_smoothing: float = 0.0, steps: Optional[int] = None,
                   warmup: Optional[int] = None) -> float:
    """A minimal hand-written loop: autocast forward, cross-entropy, backward, AdamW step (fused on CUDA, as the
    tool's); `freeze`: a run's FreezePlan, so both loops train the same parameters with the same BN modes."""
    model.train()
    if freeze is not None:
        freeze.apply(model, 0)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05,
                                  **fused)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision or args.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    steps = args.steps if steps is None else steps
    warmup = args.warmup if warmup is None else warmup

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * len(y) / (time.perf_counter() - start)


def tool_img_s(args, root: Path, work: Path, name: str, device, *overrides: str) -> tuple[float, Any]:
    """transfer's TransferModule in its Trainer on synthetic batches; also returns its (untrained) model copy."""
    cfg = run_cfg(args, root, work / name, "transfer=fine_tune", "augmentation=none", "trainer.max_epochs=1",
                  "callbacks.monitor=train/loss_epoch", "callbacks.mode=min", *overrides)
    (work / name).mkdir(parents=True, exist_ok=True)
    run = build_run(cfg, work / name)
    pristine = copy.deepcopy(run.model) if compile_mode(cfg.trainer.compile) is None else None
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(run.splits.class_names), (args.batch_size,), device=device)
    timer = StepTimer(args.warmup, device)
    run.trainer.callbacks.append(timer)
    run.trainer.fit(run.module, train_dataloaders=SyntheticBatches(x, y, args.warmup + args.steps),
                    val_dataloaders=SyntheticBatches(x, y, 1))
    del run
    release(device)
    return timer.img_s, (pristine, x, y)


def section_ab(args, root: Path, work: Path, device, compiled: bool) -> Dict[str, Any]:
    eager_tool, (model, x, y) = tool_img_s(args, root, work, "a_tool", device)
    raw = raw_loop_img_s(model.to(device), x, y, args, device)
    # Not part of the target: how much of the gap is the progress bar, whose refresh reads (syncs) metrics.
    quiet, _ = tool_img_s(args, root, work, "a_tool_quiet", device, "trainer.enable_progress_bar=false")
    out: Dict[str, Any] = {"a_eager": {"raw_img_s": raw, "tool_img_s": eager_tool, "ratio": eager_tool / raw,
                                       "tool_no_progress_bar_img_s": quiet, "target": TARGETS["a_eager"]}}
    if compiled:
        compiled_model = copy.deepcopy(model)
        compiled_model.compile()
        raw_c = raw_loop_img_s(compiled_model, x, y, args, device)
        tool_c, _ = tool_img_s(args, root, work, "b_tool", device, "trainer.compile=true")
        out["b_compile"] = {"raw_img_s": raw_c, "tool_img_s": tool_c, "speedup_vs_eager": tool_c / eager_tool,
                            "ratio_vs_raw": tool_c / raw_c, "target": TARGETS["b_compile"]}
    del model
    return out


# ---------------------------------------------------------------- (e): a real recipe


class EpochClock(Callback):
    """Wall seconds of the first training epoch (the device synchronized at its end)."""

    def __init__(self, device: torch.device):
        self.device, self.start, self.seconds = device, None, None

    def on_train_epoch_start(self, trainer, pl_module):
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if self.seconds is None:
            sync(self.device)
            self.seconds = time.perf_counter() - self.start


def section_e(args, work: Path, device) -> Dict[str, Any]:
    """experiment=<--experiment> as `transfer train` runs it (its data, model, augmentation, precision, loaders),
    one epoch or --recipe-steps steps without validation or test; then the raw loop on one of its batches."""
    name = "e_recipe"
    accelerator = ["trainer=gpu"] if device.type == "cuda" else ["trainer=cpu"]
    steps = ([f"trainer.limit_train_batches={args.recipe_steps}"] if args.recipe_steps else [])
    cfg = compose([f"experiment={args.experiment}", *accelerator, "trainer.max_epochs=1", *steps,
                   "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "callbacks.save_last=false",
                   f"paths.output_dir={work / name}", *str(args.recipe_overrides or "").split()])
    (work / name).mkdir(parents=True, exist_ok=True)
    run = build_run(cfg, work / name)
    batches = run.trainer.num_training_batches if args.recipe_steps == 0 else args.recipe_steps
    warmup = max(1, min(5, int(batches) // 4)) if np.isfinite(batches) else 5
    timer, clock = StepTimer(warmup, device), EpochClock(device)
    run.trainer.callbacks += [timer, clock]
    pristine, freeze = copy.deepcopy(run.model), run.module.freeze
    run.trainer.fit(run.module, datamodule=run.datamodule)
    tool = timer.img_s
    images, labels = run.images.strip_bad(next(iter(run.images.train_dataloader())), device)
    precision, smoothing = str(run.cfg.trainer.precision), float(run.cfg.augmentation.label_smoothing)
    out = {"experiment": args.experiment, "device": device.type, "precision": precision,
           "batch_size": int(run.images.batch_size), "image_size": list(images.shape[-2:]),
           "steps": int(batches), "workers": run.images.loading.num_workers,
           "first_batch_latency_s": run.first_step.first_batch_s, "first_step_latency_s": run.first_step.first_step_s,
           "first_epoch_s": clock.seconds, "tool_img_s": tool}
    del run
    release(device)
    x = images.to(device).contiguous(memory_format=torch.channels_last)
    raw = raw_loop_img_s(pristine.to(device, memory_format=torch.channels_last), x, labels.to(device), args, device,
                         precision=precision, freeze=freeze, label_smoothing=smoothing, warmup=warmup,
                         steps=max(5, int(batches) - warmup) if np.isfinite(batches) else 20)
    out.update(raw_img_s=raw, ratio=(tool / raw) if tool else None, target=TARGETS["e_recipe"],
               first_step_target_s=TARGETS["e_first_step_s"])
    return {name: out}


# ---------------------------------------------------------------- (g): scripts/gpu_check.py


def section_g() -> Dict[str, Any]:
    script = Path(__file__).resolve().parent / "gpu_check.py"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900)
    return {"g_gpu_check": {"returncode": proc.returncode, "seconds": time.perf_counter() - start,
                            "output": proc.stdout.splitlines(), "stderr_tail": proc.stderr[-2000:]}}


# ---------------------------------------------------------------- (h): host work per step


def raw_loop_host(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int,
                  device, freeze=None) -> Dict[str, float]:
    """CPU (process) time and wall time per step of the minimal loop, over the parameters that train
    (`freeze`: the run's FreezePlan, so both loops compute the same: frozen stages without gradients, their
    BatchNorm in eval mode)."""
    model.train()
    if freeze is not None:
        freeze.apply(model, 0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)

    def step():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync(device)
    return {"cpu_ms": (time.process_time() - cpu) / steps * 1e3, "wall_ms": (time.perf_counter() - wall) / steps * 1e3}


class BareModule(pl.LightningModule):
    """The least a LightningModule can be: forward, loss, AdamW. No logging, metrics or callbacks of ours."""

    def __init__(self, model: torch.nn.Module, freeze):
        super().__init__()
        self.model, self.freeze = model, freeze

    def on_fit_start(self):
        self.freeze.apply(self.model, 0)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)


def bare_lightning_host(model, freeze, x, y, steps: int, warmup: int, device, work: Path) -> Dict[str, float]:
    timer = StepTimer(warmup, device)
    trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer], default_root_dir=str(work))
    trainer.fit(BareModule(model, freeze), train_dataloaders=SyntheticBatches(x, y, warmup + steps))
    return {"cpu_ms": timer.cpu / timer.steps * 1e3, "wall_ms": timer.elapsed / timer.steps * 1e3}


def section_h(args, root: Path, work: Path, device) -> Dict[str, Any]:
    """Host work per training step, the tool (elpv_best's shape: partial freeze, AdamW, warmup + cosine, progress
    bar, metrics.csv) vs the raw loop, on a tiny model whose compute is small, so the difference is the tool's
    per-step Python: visible without a GPU."""
    steps, warmup, batch, size = args.host_steps, 10, 32, 32
    cfg = compose([
        "~experiment", "data=imagefolder", f"data.root={root}", "model.backbone=test_efficientnet",
        "model.pretrained=false", f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        "trainer.devices=1", "trainer.precision=32-true", f"data.batch_size={batch}", f"data.image_size={size}",
        "data.num_workers=0", "data.val_fraction=0.1", "transfer=partial", "transfer.freeze_stages=2",
        "augmentation=none", "scheduler.warmup_epochs=0.5", "trainer.max_epochs=1", "logger=csv",
        "callbacks.rich_progress=true", "trainer.enable_progress_bar=true", "trainer.num_sanity_val_steps=0",
        "callbacks.monitor=train/loss_epoch", "callbacks.mode=min", f"paths.output_dir={work / 'h_tool'}",
    ])
    (work / "h_tool").mkdir(parents=True, exist_ok=True)
    run = build_run(cfg, work / "h_tool")
    pristine, freeze = copy.deepcopy(run.model), run.module.freeze
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 3, size, size), generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(run.splits.class_names), (batch,), generator=g).to(device)
    timer = StepTimer(warmup, device)
    run.trainer.callbacks.append(timer)
    run.trainer.fit(run.module, train_dataloaders=SyntheticBatches(x, y, warmup + steps),
                    val_dataloaders=SyntheticBatches(x, y, 1))
    tool = {"cpu_ms": timer.cpu / timer.steps * 1e3, "wall_ms": timer.elapsed / timer.steps * 1e3}
    del run
    release(device)
    bare = bare_lightning_host(copy.deepcopy(pristine).to(device), freeze, x, y, steps, warmup, device,
                               work / "h_bare")
    raw = raw_loop_host(pristine.to(device), x, y, steps, warmup, device, freeze=freeze)
    return {"h_host": {"model": "test_efficientnet", "batch": batch, "image_size": size, "steps": steps,
                       "tool_cpu_ms_per_step": tool["cpu_ms"], "raw_cpu_ms_per_step": raw["cpu_ms"],
                       "overhead_cpu_ms_per_step": tool["cpu_ms"] - raw["cpu_ms"],
                       # what a bare LightningModule in a bare Trainer costs: Lightning's own loop, not the tool's
                       "bare_lightning_cpu_ms_per_step": bare["cpu_ms"],
                       "tool_over_bare_lightning_cpu_ms_per_step": tool["cpu_ms"] - bare["cpu_ms"],
                       "tool_wall_ms_per_step": tool["wall_ms"], "raw_wall_ms_per_step": raw["wall_ms"],
                       "ratio": raw["cpu_ms"] / tool["cpu_ms"], "target": TARGETS["h_host"]}}


# ---------------------------------------------------------------- (c): feature cache


def timed_train(cfg) -> float:
    start = time.perf_counter()
    train(cfg)
    return time.perf_counter() - start


def section_c(args, root: Path, work: Path) -> Dict[str, Any]:
    # The epoch loop with and without the cache (a solved head, transfer.head_solver=lbfgs, takes one pass).
    common = ["transfer=feature_extract", "augmentation=none", f"trainer.max_epochs={args.cache_epochs}",
              f"transfer.cache_dir={work / 'feature_cache'}", "transfer.head_solver=sgd"]
    recompute = timed_train(run_cfg(args, root, work / "c_recompute", *common, "transfer.cache_features=false"))
    cold = timed_train(run_cfg(args, root, work / "c_cached", *common, "transfer.cache_features=true"))
    warm = timed_train(run_cfg(args, root, work / "c_cached_warm", *common, "transfer.cache_features=true"))
    return {"c_feature_cache": {"epochs": args.cache_epochs, "images": args.images, "recompute_s": recompute,
                                "cached_cold_s": cold, "cached_warm_s": warm, "ratio": recompute / cold,
                                "warm_ratio": recompute / warm, "target": TARGETS["c_feature_cache"]}}


# ---------------------------------------------------------------- (p): the head on cached features


class EpochMarks(Callback):
    """Wall-clock time at each training epoch's start and at the fit's end."""

    def __init__(self) -> None:
        self.marks: List[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.marks.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.marks.append(time.perf_counter())


def section_p(args, work: Path) -> Dict[str, Any]:
    common = [f"experiment={args.probe_experiment}", f"transfer.cache_dir={work / 'probe_cache'}",
              "callbacks.rich_progress=false", "trainer.enable_progress_bar=false"]
    solved_dir, sgd_dir = (Path(fresh_dir(str(work / name))) for name in ("p_lbfgs", "p_sgd"))  # a rerun: _2, ...
    start = time.perf_counter()
    summary = train(compose([*common, "transfer.head_solver=lbfgs", f"paths.output_dir={solved_dir}"]))
    solved_s = time.perf_counter() - start
    cfg = compose([*common, "transfer.head_solver=sgd", f"trainer.max_epochs={args.probe_epochs}",
                   f"paths.output_dir={sgd_dir}"])
    run = build_run(cfg, sgd_dir)
    marks = EpochMarks()
    run.trainer.callbacks.append(marks)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    epochs = len(marks.marks) - 2  # from the second epoch's start (the first builds the loaders) to the end
    probe = summary.get("probe") or {}
    return {"p_probe": {"experiment": args.probe_experiment, "fit_s": probe.get("fit_seconds"),
                        "strength": probe.get("strength"), "test_acc": summary.get("test_acc"),
                        "solved_run_s": solved_s, "feature_cache": summary.get("feature_cache"),
                        "sgd_epochs": args.probe_epochs,
                        "sgd_epochs_per_s": epochs / (marks.marks[-1] - marks.marks[1]) if epochs > 0 else None,
                        "targets": {"fit_s": TARGETS["p_fit_s"], "sgd_epochs_per_s": TARGETS["p_sgd_epochs_s"]}}}


# ---------------------------------------------------------------- (d): data pipeline


def loader_img_s(run, device, decode_device) -> float:
    images = run.images
    if decode_device is not None:  # the device decoder as data.decode=gpu builds it, on any device
        images.decoder = DeviceDecoder.for_transforms(images.transforms, decode_device)
    loader = images.loader("train", augment=True, shuffle=True)
    count, start = 0, None
    for i, batch in enumerate(loader):
        x, target = images.strip_bad(batch, device)
        x = x.to(device, non_blocking=True)
        if i == 0:  # worker start-up is not throughput
            sync(device)
            start = time.perf_counter()
            continue
        count += len(target)
    sync(device)
    return count / (time.perf_counter() - start) if start is not None and count else float("nan")


def section_d(args, root: Path, work: Path, device, ceiling: Optional[float]) -> Dict[str, Any]:
    cfg = run_cfg(args, root, work / "d_loader", "augmentation=light", "transfer=fine_tune")
    (work / "d_loader").mkdir(parents=True, exist_ok=True)
    run = build_run(cfg, work / "d_loader")
    workers = run.images.loading.num_workers
    cpu_decode = loader_img_s(run, device, None)
    run = build_run(cfg, work / "d_loader")
    device_decode = loader_img_s(run, device, device)  # on a CPU machine: the same code with device='cpu'
    e2e: Dict[str, Optional[float]] = {}
    for decode in (["gpu", "cpu"] if device.type == "cuda" else ["cpu"]):
        name = f"d_e2e_{decode}"
        (work / name).mkdir(parents=True, exist_ok=True)
        run = build_run(run_cfg(args, root, work / name, "augmentation=light", "transfer=fine_tune",
                                "trainer.max_epochs=1", f"data.decode={decode}", "trainer.limit_val_batches=0",
                                "callbacks.monitor=train/loss_epoch", "callbacks.mode=min"),
                        work / name)
        warmup = min(args.warmup, max(1, run.images.samples("train").__len__() // args.batch_size // 3))
        timer = StepTimer(warmup, device)
        run.trainer.callbacks.append(timer)
        run.trainer.fit(run.module, datamodule=run.datamodule)
        e2e[decode] = timer.img_s
        del run
        release(device)
    best = e2e.get("gpu") or e2e.get("cpu")
    return {"d_data": {"workers": workers, "jpeg_engine": jpeg_engine().name,
                       "cpu_decode_img_s": cpu_decode, "device_decode_img_s": device_decode,
                       "device_decode_on": device.type, "e2e_gpu_decode_img_s": e2e.get("gpu"),
                       "e2e_cpu_decode_img_s": e2e.get("cpu"), "synthetic_img_s": ceiling,
                       "ratio": (best / ceiling) if best and ceiling else None, "target": TARGETS["d_data"]}}


# ---------------------------------------------------------------- report


def print_table(results: Dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"transfer benchmark: {results['settings']['model']} on {results['device_name']}")
    for col in ("section", "measure", "value"):
        table.add_column(col)
    for section, values in results.items():
        if not isinstance(values, dict) or section in ("settings", "g_gpu_check"):
            continue
        for key, value in values.items():
            shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
            table.add_row(section, key, shown)
            section = ""
    console = Console()
    console.print(table)
    if "g_gpu_check" in results:
        console.print("\n".join(results["g_gpu_check"]["output"]))
    summary = Table(title="targets")
    for col in ("section", "measure", "value", "target", "met"):
        summary.add_column(col)
    for section, key, target_key, higher in HEADLINES:
        value = results.get(section, {}).get(key)
        if section not in results:
            continue
        target = TARGETS[target_key]
        met = "-" if value is None else ("yes" if (value >= target if higher else value <= target) else "no")
        shown = "n/a" if value is None else f"{value:,.2f}"
        summary.add_row(section, key, shown, f"{'>=' if higher else '<='} {target:g}", met)
    console.print(summary)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    logging.getLogger("transfer_cli").setLevel(logging.WARNING)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="transfer_bench_")).expanduser().resolve()
    root = work / "jpegs"
    if not root.is_dir():
        make_jpeg_folder(root, args.images, args.source_size)
    results: Dict[str, Any] = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0],
                     "jpeg_engine": jpeg_engine().name},
    }
    skipped = {}
    if "a" in args.sections or "d" in args.sections:
        results.update(section_ab(args, root, work, device, compiled="b" in args.sections))
    if "b" not in args.sections:
        skipped["b_compile"] = "not in --sections (torch.compile takes minutes on a CPU)"
    if "h" in args.sections:
        results.update(section_h(args, root, work, device))
    if "c" in args.sections:
        results.update(section_c(args, root, work))
    if "d" in args.sections:
        ceiling = results.get("a_eager", {}).get("tool_img_s")
        results.update(section_d(args, root, work, device, ceiling))
    if "e" in args.sections:
        results.update(section_e(args, work, device))
    if "p" in args.sections:
        results.update(section_p(args, work))
    if "g" in args.sections:
        results.update(section_g())
    results["skipped"] = skipped
    print_table(results)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {Path(args.out).resolve()}  (work dir: {work})")
    return results


if __name__ == "__main__":
    main()
