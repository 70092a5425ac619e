"""The one inference loop: a network over batches without gradients, on one device, precision and layout.

The frozen-feature pre-pass, `transfer eval` and `transfer predict` all run through `infer`, so the three agree
on how a batch reaches the device, which autocast applies and whether inputs are channels_last: the numbers
`transfer eval` prints are the ones the trainer logged for the same images.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, ContextManager, Iterable, Optional, Tuple

import torch

from transfer_cli.precision import autocast_dtype

log = logging.getLogger("transfer_cli")



def pick_device(accelerator: str) -> torch.device:
    """trainer.accelerator on this machine: a GPU when asked for (or `auto`) and present, else the CPU, so a
    checkpoint trained on a GPU still evaluates on a laptop."""
    wanted = str(accelerator or "auto")
    if wanted in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    if wanted in ("gpu", "cuda"):
        log.warning("trainer.accelerator=%s but no GPU is available: running on the CPU", wanted)
    return torch.device("cpu")


def autocast_for(device: torch.device, precision: str) -> Callable[[], ContextManager]:
    """trainer.precision as an autocast context factory, as Lightning's precision plugin applies it (the one
    mapping: precision.autocast_dtype)."""
    name = autocast_dtype(precision, device.type)
    if name is None:
        return contextlib.nullcontext
    dtype = getattr(torch, name)
    return lambda: torch.autocast(device.type, dtype=dtype)


def infer(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[Any], *, device: torch.device,
          autocast: Callable[[], ContextManager] = contextlib.nullcontext, channels_last: bool = False,
          prepare: Optional[Callable[[Any], Tuple[torch.Tensor, torch.Tensor]]] = None,
          progress: Optional[str] = None, total: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(outputs, targets) on the CPU, float32, for every batch with at least one image.

    `prepare(batch) -> (inputs, targets)` turns a loader batch into tensors (dropping unreadable images, or
    decoding on the device); `progress`: a label for a transient progress bar.
    """
    outputs, targets = [], []
    bar = contextlib.nullcontext(None)
    if progress is not None:
        from rich.progress import Progress

        bar = Progress(transient=True)
    # no_grad, not inference_mode: cached features become training inputs, which inference tensors cannot be.
    with torch.no_grad(), bar as progress_bar:
        task = progress_bar.add_task(progress, total=total) if progress_bar is not None else None
        for batch in batches:
            inputs, target = prepare(batch) if prepare is not None else batch
            if len(target):
                inputs = inputs.to(device, non_blocking=True)
                if channels_last and inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                with autocast():
                    out = forward(inputs)
                outputs.append(out.float().cpu())
                targets.append(target.cpu())
            if progress_bar is not None:
                progress_bar.advance(task)
    if not outputs:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(outputs), torch.cat(targets)


def place_model(model: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """The network on `device` in eval mode, NHWC when asked (the fast layout of cuDNN and oneDNN convolutions)."""
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


__all__ = ["infer", "pick_device", "autocast_for", "place_model"]
