"""The checks only a CUDA machine can answer (issue 15), beside scripts/benchmark.py, which runs this as its
section (g) and keeps the output in its JSON. Prepared on a CPU machine; not yet run on a GPU.

  PYTHONUNBUFFERED=1 python scripts/gpu_check.py 2>&1 | tee gpu_check.log

Budget: about 3-4 minutes on an H200. Each part prints one block; a failing part prints its error and the rest go on.

  A  filesystem latency: what `import torch` spends in torch custom-op registration (inspect.getmodule's
     realpath sweeps) and what one os.lstat costs on this machine's site-packages
  B  torch.manual_seed with CUDA initialised (the tool's per-batch SeedEveryBatch) vs seeding the generators directly
  C  cudnn.benchmark: first forward+backward per new batch shape (32, then a last batch of 16), benchmark on vs off
  D  steady state, tf_efficientnet_lite0 at 300 px, bf16 autocast, batch 32, data already on the GPU:
     raw loop with AdamW foreach / fused, then torch.compile(mode="reduce-overhead")
  E  host syncs in one training step of the pattern the tool uses (torch.cuda.set_sync_debug_mode)
  F  batched nvJPEG decode of 32 JPEGs: torchvision.io.decode_jpeg vs torchcodec.decoders.decode_jpeg (if installed),
     and data/resample.py's batched crop + resize + flip of the decoded batch (the rest of data.decode=gpu)
"""

from __future__ import annotations

import io
import statistics
import subprocess
import sys
import textwrap
import time
import traceback


def part(name):
    def wrap(fn):
        print(f"\n=== {name}", flush=True)
        t = time.perf_counter()
        try:
            fn()
        except Exception:
            traceback.print_exc()
        print(f"--- ({time.perf_counter() - t:.1f} s)", flush=True)
    return wrap


@part("A  import torch: custom-op registration time and lstat latency")
def _a():
    code = textwrap.dedent("""
        import os, sys, time, posixpath
        n = {"rp": 0, "t": 0.0}
        _rp = posixpath.realpath
        def rp(p, *a, **k):
            t = time.perf_counter()
            try: return _rp(p, *a, **k)
            finally: n["rp"] += 1; n["t"] += time.perf_counter() - t
        posixpath.realpath = os.path.realpath = rp
        t = time.perf_counter(); import torch; total = time.perf_counter() - t
        import torch._library.custom_ops as co
        print(f"import torch {total:.2f}s; custom ops {len(co.OPDEFS)}; realpath calls {n['rp']} taking {n['t']:.2f}s")
        d = os.path.dirname(torch.__file__); files = [os.path.join(d, f) for f in os.listdir(d)][:200]
        t = time.perf_counter()
        for f in files: os.lstat(f)
        print(f"os.lstat in site-packages/torch: {(time.perf_counter() - t) / len(files) * 1e6:.1f} us per call")
    """)
    print(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip())


import torch  # noqa: E402

dev = torch.device("cuda")
torch.cuda.init()
print(torch.__version__, torch.cuda.get_device_name(), flush=True)


def timed(fn, reps=50, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)


@part("B  per-batch seeding cost with CUDA initialised")
def _b():
    def deep(n, fn):
        return fn() if n == 0 else deep(n - 1, fn)
    a = deep(60, lambda: timed(lambda: torch.manual_seed(1234), reps=200))
    b = deep(60, lambda: timed(lambda: (torch.default_generator.manual_seed(1234), torch.cuda.manual_seed(1234)), reps=200))
    print(f"torch.manual_seed at a 60-frame stack: {a * 1e6:.0f} us; CPU generator + torch.cuda.manual_seed: {b * 1e6:.1f} us")


def lite0():
    import timm
    m = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2)
    return m.to(dev, memory_format=torch.channels_last)


@part("C  cudnn.benchmark: first forward+backward per batch shape (fresh process each)")
def _c():
    code = textwrap.dedent("""
        import sys, time, torch, timm
        torch.backends.cudnn.benchmark = sys.argv[1] == "1"
        m = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2).cuda().to(memory_format=torch.channels_last)
        out = []
        for n in (32, 32, 16, 16):
            x = torch.randn(n, 3, 300, 300, device="cuda").contiguous(memory_format=torch.channels_last)
            torch.cuda.synchronize(); t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                m(x).float().sum().backward()
            torch.cuda.synchronize(); out.append(f"batch {n}: {time.perf_counter() - t:.2f}s")
        print("benchmark=" + sys.argv[1] + ": " + ", ".join(out))
    """)
    for flag in ("1", "0"):
        r = subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True)
        print(r.stdout.strip() or r.stderr.strip()[-500:])


@part("D  steady-state step: raw loop, AdamW foreach vs fused, compile reduce-overhead")
def _d():
    torch.backends.cudnn.benchmark = True
    x = torch.randn(32, 3, 300, 300, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (32,), device=dev)
    for label, kw, mode in (("foreach", {"foreach": True}, None), ("fused", {"fused": True}, None),
                            ("fused + compile reduce-overhead", {"fused": True}, "reduce-overhead")):
        m = lite0()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, **kw)
        fwd = torch.compile(m, mode=mode) if mode else m

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(fwd(x), y)
            loss.backward()
            opt.step()

        t = time.perf_counter(); step(); torch.cuda.synchronize(); first = time.perf_counter() - t
        host = timed(step, reps=30)  # host time per step: the loop never waits for the GPU
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(30):
            step()
        torch.cuda.synchronize(); dev_t = (time.perf_counter() - t) / 30
        print(f"{label:32s} first step {first:6.2f}s; host enqueue {host * 1e3:6.2f} ms/step; "
              f"wall {dev_t * 1e3:6.2f} ms/step = {32 / dev_t:6.0f} img/s")


@part("E  host syncs in a step with the tool's per-step pattern (sync debug mode = warn)")
def _e():
    import warnings
    from torchmetrics.classification import MulticlassAccuracy
    m = lite0()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    acc = MulticlassAccuracy(num_classes=2, average="micro").to(dev)
    acc_nv = MulticlassAccuracy(num_classes=2, average="micro", validate_args=False).to(dev)
    x = torch.randn(32, 3, 300, 300, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (32,), device=dev)
    checks = {
        "forward+backward+AdamW": lambda: (opt.zero_grad(), m(x).float().sum().backward(), opt.step()),
        "torch.manual_seed": lambda: torch.manual_seed(1),
        "MulticlassAccuracy forward (validate_args=True)": lambda: acc(m(x).detach(), y),
        "MulticlassAccuracy update (validate_args=False)": lambda: acc_nv.update(m(x).detach(), y),
        "loss.item() (progress bar)": lambda: m(x).sum().item(),
    }
    for name, fn in checks.items():
        fn()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(x.message).splitlines()[0][:80] for x in w if "synchroniz" in str(x.message).lower()]
        print(f"{name:48s} syncs: {len(syncs)} {syncs[:2]}")


@part("F  batched JPEG decode on the GPU: torchvision vs torchcodec")
def _f():
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(32):
        a = (rng.random((375, 500, 3)) * 64 + np.linspace(0, 190, 500)[None, :, None]).astype(np.uint8)
        buf = io.BytesIO(); Image.fromarray(a).save(buf, format="JPEG", quality=90)
        jpegs.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    import warnings
    warnings.simplefilter("ignore")
    from torchvision.io import decode_jpeg as tv
    print(f"torchvision decode_jpeg(list of 32, cuda): {timed(lambda: tv(jpegs, device=dev), reps=20) * 1e3:.2f} ms/batch")
    try:
        from torchcodec.decoders import decode_jpeg as tc
    except ImportError as e:
        print(f"torchcodec not installed ({e}); carry its wheel to compare")
        return
    print(f"torchcodec decode_jpeg(list of 32, cuda):  {timed(lambda: tc(jpegs, device=dev), reps=20) * 1e3:.2f} ms/batch")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        print(f"torchcodec on a side stream:               {timed(lambda: tc(jpegs, device=dev), reps=20) * 1e3:.2f} ms/batch")


@part("F2 data.decode=gpu's batched resample: 32 decoded 500x375 JPEGs -> 224 px random resized crops + flips")
def _f2():
    from transfer_cli.data.resample import plan_pipeline, resample
    from transfer_cli.data.transforms import train_transform
    from transfer_cli.config.compose import as_schema, compose

    aug = as_schema(compose(["~experiment", "augmentation=light", "augmentation.vflip=0.5"])).augmentation
    config = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    plan, _ = plan_pipeline(train_transform(config, aug))
    g = torch.Generator(device=dev).manual_seed(0)
    images = [torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8, device=dev, generator=g) for _ in range(32)]
    params = torch.tensor([plan.draw(375, 500) for _ in images], dtype=torch.float64)
    ms = timed(lambda: plan.tail(resample(images, params, plan)), reps=20) * 1e3
    print(f"batched resample of 32 images: {ms:.2f} ms/batch = {32 / ms * 1e3:,.0f} img/s (host time: the kernels "
          f"run async; the wall time per batch follows)")
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20):
        plan.tail(resample(images, params, plan))
    torch.cuda.synchronize(); print(f"wall: {(time.perf_counter() - t) / 20 * 1e3:.2f} ms/batch")
