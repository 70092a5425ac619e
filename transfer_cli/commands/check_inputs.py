"""How an exported network is checked against the checkpoint's (export, the timm folder of push, predict on ONNX).

The inputs: two batch sizes, neither the one the network is exported with, so the check also covers the dynamic
batch axis; random pixels through the run's real mean and std, so the logits compared have realistic ranges.

The test has numpy.allclose's form, absolute + relative: |exported - pytorch| <= atol + rtol * scale for every
logit, where scale is the largest |logit| of the same image. An absolute bound alone fails a correct export
whose logits are large: a linear probe solved on standardized features folds 1 / std into its weights (up to
~180 on the demo's EfficientNet-Lite0 features), so float32 rounding in another runtime, ~1e-6 of logits of
~15, passed atol=1e-4 on one CPU and failed it (1.03e-4) on another. The scale is the image's largest logit, not
each logit's own value (numpy.allclose's), because rounding in a logit grows with the terms summed into it,
which a logit near zero in a row of large ones does not show: on EfficientNet-Lite0 with a probe solved on 18
images, logits (-102.93, 0.83, 102.09) came back 3.8e-4 off for the 0.83, 41 % of numpy.allclose's tolerance
at rtol=1e-3 and 1.7 % of this one. Top-1 agreement is reported beside it: what a user of the exported model
would see change, if anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from transfer_cli.config.args import POSITIVE_FLOAT, Option
from transfer_cli.errors import TransferError

CHECK_BATCHES = (1, 3)
# The tolerances' one definition: the export command's options, and the defaults of every check that uses them.
# rtol=1e-3 of the image's largest logit: 100 to 500 times the float32 rounding measured between onnxruntime and
# PyTorch on EfficientNet-Lite0 (2e-6 to 1e-5 of it), so a correct export passes on other CPUs too.
TOLERANCE_OPTIONS = {
    "rtol": Option(POSITIVE_FLOAT, 1e-3, help="a positive relative tolerance (|diff| <= atol + rtol * max |logit|)"),
    "atol": Option(POSITIVE_FLOAT, 1e-4, help="a positive absolute tolerance (|diff| <= atol + rtol * max |logit|)"),
}
RTOL: float = TOLERANCE_OPTIONS["rtol"].default
ATOL: float = TOLERANCE_OPTIONS["atol"].default


def sample_inputs(metadata: dict, batch: int, seed: int) -> Any:
    """Normalized random images: uniform pixels through the real mean/std, so logits have realistic ranges."""
    import torch

    channels, height, width = metadata["input_size"]
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand((batch, channels, height, width), generator=generator)
    mean = torch.tensor(metadata["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(metadata["std"]).view(1, -1, 1, 1)
    return (pixels - mean) / std


@dataclass(frozen=True)
class Agreement:
    """An exported network's outputs against PyTorch's on the same inputs."""

    max_abs_diff: float
    largest_logit: float  # max |pytorch logit| over all images
    used: float  # max over logits of |diff| / (atol + rtol * its image's max |logit|): at most 1 passes
    top1_same: int
    samples: int
    rtol: float
    atol: float

    @property
    def close(self) -> bool:
        return self.used <= 1.0

    def line(self, against: str = "PyTorch") -> str:
        """One line for the command's output: what was compared and how close it came."""
        return (f"vs {against} on batches of {', '.join(map(str, CHECK_BATCHES))}: top-1 agrees on "
                f"{self.top1_same}/{self.samples}; max abs logit diff {self.max_abs_diff:.3g} at logits up to "
                f"{self.largest_logit:.3g}, {100 * self.used:.2g} % of the tolerance "
                f"(|diff| <= atol + rtol * the image's largest |logit|, rtol={self.rtol:g}, atol={self.atol:g})")

    def require(self, what: str, fix: str) -> None:
        """Raise unless every logit is within the tolerance; `what` names the exported thing."""
        if self.close:
            return
        if self.used == float("inf"):
            raise TransferError(f"{what} gives non-finite outputs or outputs of another shape than PyTorch's; "
                                "nothing was written", fix)
        raise TransferError(
            f"{what} differs from PyTorch by up to {self.max_abs_diff:.3g} at logits up to {self.largest_logit:.3g}: "
            f"{self.used:.3g} times the tolerance atol + rtol * the image's largest |logit| (rtol={self.rtol:g}, "
            f"atol={self.atol:g}); "
            f"top-1 agrees on {self.top1_same}/{self.samples}; nothing was written", fix)


def compare(pairs: Iterable[tuple[Any, Any]], rtol: float = RTOL, atol: float = ATOL) -> Agreement:
    """The Agreement of (pytorch, exported) output arrays ((batch, classes), numpy or CPU torch) over all pairs."""
    import numpy as np

    diff = largest = used = 0.0
    same = samples = 0
    for expected, got in pairs:
        expected, got = np.asarray(expected, dtype=np.float64), np.asarray(got, dtype=np.float64)
        samples += len(expected)
        if got.shape != expected.shape:
            used = float("inf")
            continue
        gap = np.abs(got - expected)
        scale = np.abs(expected).max(axis=-1, keepdims=True)
        ratio = np.where(np.isfinite(gap), gap / (atol + rtol * scale), np.inf)  # NaN never passes
        diff, largest = max(diff, float(gap.max(initial=0.0))), max(largest, float(np.abs(expected).max(initial=0.0)))
        used = max(used, float(ratio.max(initial=0.0)))
        same += int((got.argmax(axis=-1) == expected.argmax(axis=-1)).sum())
    return Agreement(diff, largest, used, same, samples, rtol, atol)


__all__ = ["CHECK_BATCHES", "TOLERANCE_OPTIONS", "RTOL", "ATOL", "Agreement", "compare", "sample_inputs"]
