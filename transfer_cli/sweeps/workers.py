"""`transfer tune tune.workers=N`: N local worker processes on one study, one GPU each where there are GPUs.

Each worker is a plain `transfer tune` with the same arguments (and tune.workers=1), so it joins the study exactly
as a SLURM array task or a second terminal would: the workers share nothing but the storage and the study folder.
A GPU run gives worker i the i-th visible GPU (CUDA_VISIBLE_DEVICES), round robin when there are more workers than
GPUs. Each worker's output goes to <study dir>/workers/<i>.log (N progress bars would garble one terminal).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from transfer_cli.config.overrides import override_key

GPU_ACCELERATORS = ("gpu", "cuda", "auto")


def visible_gpus() -> list[str]:
    """The GPUs a child may be given: CUDA_VISIBLE_DEVICES's entries (indices or UUIDs) if set, else 0..n-1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    import torch  # device_count() asks NVML; it does not start CUDA in this process

    return [str(i) for i in range(torch.cuda.device_count())]


def worker_devices(accelerator: str, workers: int, gpus: list[str]) -> list[Optional[str]]:
    """CUDA_VISIBLE_DEVICES for each worker; None leaves the environment as it is (a CPU run, no GPU)."""
    if accelerator not in GPU_ACCELERATORS or not gpus:
        return [None] * workers
    return [gpus[i % len(gpus)] for i in range(workers)]


def worker_args(args: list[str]) -> list[str]:
    """The user's arguments for one worker: the same study, one worker."""
    return [a for a in args if override_key(a) != "tune.workers"] + ["tune.workers=1"]


def run_local_workers(args: list[str], workers: int, study_dir: Path, accelerator: str) -> list[int]:
    """Start the workers, wait for all; their exit codes. Ctrl-C (or an error here) stops the ones still running."""
    gpus = visible_gpus() if accelerator in GPU_ACCELERATORS else []
    devices = worker_devices(accelerator, workers, gpus)
    log_dir = study_dir / "workers"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        for i, device in enumerate(devices):
            env = dict(os.environ)
            if device is not None:
                env["CUDA_VISIBLE_DEVICES"] = device
            with open(log_dir / f"{i}.log", "ab") as out:  # a stream, appended to by a rerun: not a file to swap
                procs.append(subprocess.Popen([sys.executable, "-m", "transfer_cli", "tune", *worker_args(args)],
                                              stdout=out, stderr=subprocess.STDOUT, env=env))
        where = ", ".join(f"GPU {d}" for d in devices) if gpus else "CPU"
        shared = " (several workers share a GPU)" if gpus and workers > len(gpus) else ""
        print(f"{workers} workers on {where}{shared}; their output: {log_dir}/<i>.log", flush=True)
        exits: dict[int, int] = {}
        while len(exits) < len(procs):  # reap each as it ends: a zombie's PID looks alive to the other workers
            for i, proc in enumerate(procs):
                if i not in exits and proc.poll() is not None:
                    exits[i] = code = proc.returncode
                    state = "done" if code == 0 else (f"killed by signal {-code}" if code < 0 else f"exit {code}")
                    print(f"worker {i} (PID {proc.pid}): {state}", flush=True)
            time.sleep(0.5)
        return [exits[i] for i in range(len(procs))]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()


__all__ = ["run_local_workers", "worker_devices", "worker_args", "visible_gpus"]
