"""Crops, resizes, flips and quarter turns of a whole batch of images of any sizes, in two matrix products.

The batched half of data.decode=gpu. torchvision's antialiased resize is separable: each output row is a weighted
sum of input rows and each output column of input columns, with weights that depend only on the sizes and the
crop (a triangle filter for bilinear, Keys' cubic with a = -0.5 for bicubic, widened by the downscale factor:
ATen's `_upsample_*_aa` kernels, after PIL's ImagingResample). So image n's crop + resize is
`A_n @ X_n @ B_n^T`, with A_n the row weights (output rows x input rows) and B_n the column weights; a flip
reverses the output order of A or B, a half turn their input order, and a quarter turn reads the transposed
image with one of them reversed. Images of different sizes are zero-padded into one batch whose padding gets zero weight:
one pair of batched matrix products per batch, whatever the mix of sizes, crops, upscaling and downscaling, with
no per-image step. The weights are computed as torchvision computes them, so results match its `resized_crop`,
flips and `rot90` to rounding (tests/test_gpu_decode.py).

What is random (the turn, the crop box, the flips) is drawn per image where the file is read, in the data-loader
workers, by the same transforms in the same order as data.decode=cpu draws them: under the same seed, both paths
crop and flip each image the same way, and a resumed run replays them (data/seeded.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torchvision.transforms import InterpolationMode, v2

from transfer_cli.data.augment import RandomRot90

# Per image, in the rotated image's coordinates: rows (start, length, full, offset) and columns (same) mean
# "resize source rows [start, start + length) to `full` rows and keep rows offset .. offset + out - 1".
TURNS, Y0, YLEN, YFULL, YOFF, X0, XLEN, XFULL, XOFF, VFLIP, HFLIP = range(11)
PARAMS = 11

# Output steps that act on each pixel alone, applied to the whole batch after the resampling
PER_PIXEL = (v2.ToImage, v2.ToDtype, v2.Normalize, v2.ToPureTensor)


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp_(min=0.0)


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    a = -0.5  # PIL's and torchvision's antialiasing cubic
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


# interpolation -> (filter, its support at scale 1)
KERNELS = {InterpolationMode.BILINEAR: (_bilinear, 1.0), InterpolationMode.BICUBIC: (_bicubic, 2.0)}


def _mode(value: Any) -> Any:
    try:
        return InterpolationMode(value) if isinstance(value, str) else value
    except ValueError:
        return value


@dataclass(frozen=True)
class ResamplePlan:
    """The geometric head of a v2 pipeline, as per-image parameters and one batched resample, then `tail`.

    Training: [RandomRot90] RandomResizedCrop [RandomHorizontalFlip] [RandomVerticalFlip]; evaluation: Resize,
    CenterCrop; both antialiased bilinear or bicubic, then per-pixel steps (to float, normalize).
    """

    size: Tuple[int, int]  # output (height, width)
    interpolation: Any
    tail: Callable[[torch.Tensor], torch.Tensor]
    rot90: Optional[RandomRot90] = None
    crop: Optional[v2.RandomResizedCrop] = None
    hflip: Optional[v2.RandomHorizontalFlip] = None
    vflip: Optional[v2.RandomVerticalFlip] = None
    resize: Optional[Sequence[int]] = None  # evaluation: Resize's size, then a centre crop to `size`

    def draw(self, height: int, width: int) -> List[float]:
        """Image (height x width)'s parameters, drawing from torch's RNG exactly as the v2 pipeline would."""
        out_h, out_w = self.size
        if self.crop is None:  # evaluation: resize, then the centre crop, as v2.Resize and v2.CenterCrop compute
            full_h, full_w = resized_size(height, width, self.resize)
            top, left = int(round((full_h - out_h) / 2.0)), int(round((full_w - out_w) / 2.0))
            return [0, 0, height, full_h, top, 0, width, full_w, left, 0, 0]
        turns = self.rot90.make_params([])["turns"] if self.rot90 is not None else 0
        if turns % 2:
            height, width = width, height
        box = self.crop.make_params([torch.empty((1, 1, 1)).expand(3, height, width)])
        # v2's random-apply transforms draw one number and skip the op when it is >= p
        hflip = self.hflip is not None and bool(torch.rand(1) < self.hflip.p)
        vflip = self.vflip is not None and bool(torch.rand(1) < self.vflip.p)
        return [turns, box["top"], box["height"], out_h, 0, box["left"], box["width"], out_w, 0, vflip, hflip]


def resized_size(height: int, width: int, size: Sequence[int]) -> Tuple[int, int]:
    """v2.Resize's output size: [s] sets the shorter side (the longer one scaled and truncated), [h, w] both."""
    if len(size) == 2:
        return int(size[0]), int(size[1])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = int(size[0]), int(int(size[0]) * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def plan_pipeline(transform: Any) -> Tuple[Optional[ResamplePlan], List[str]]:
    """(the plan of a v2 pipeline, []) when its steps are ones the batched path does, else (None, the others)."""
    steps = list(getattr(transform, "transforms", [transform]))
    cut = len(steps)
    while cut > 0 and isinstance(steps[cut - 1], PER_PIXEL):
        cut -= 1
    head, tail = steps[:cut], v2.Compose(steps[cut:]) if steps[cut:] else v2.Identity()
    kinds = [type(step) for step in head]
    if kinds[:1] == [RandomRot90]:
        rot90, head = head[0], head[1:]
    else:
        rot90 = None
    others: List[str] = []
    if head and isinstance(head[0], v2.RandomResizedCrop):
        crop, flips = head[0], head[1:]
        hflip = next((f for f in flips if type(f) is v2.RandomHorizontalFlip), None)
        vflip = next((f for f in flips if type(f) is v2.RandomVerticalFlip), None)
        if [f for f in flips if f is not hflip and f is not vflip] or (hflip and vflip and flips.index(hflip) > 0):
            others = [type(f).__name__ for f in flips if f is not hflip and f is not vflip] or ["flip order"]
        size, interpolation, antialias = tuple(crop.size), _mode(crop.interpolation), crop.antialias
        plan = ResamplePlan(size, interpolation, tail, rot90=rot90, crop=crop, hflip=hflip, vflip=vflip)
    elif [type(s) for s in head] == [v2.Resize, v2.CenterCrop] and rot90 is None and head[0].max_size is None:
        resize, center = head
        size = tuple(center.size) if len(center.size) == 2 else (center.size[0], center.size[0])
        interpolation, antialias = _mode(resize.interpolation), resize.antialias
        plan = ResamplePlan(size, interpolation, tail, resize=list(resize.size))
    else:
        return None, [type(s).__name__ for s in head if not isinstance(s, (RandomRot90,))] or ["no crop"]
    if interpolation not in KERNELS or not antialias:
        others.append(f"{getattr(interpolation, 'value', interpolation)} interpolation"
                      f"{'' if antialias else ' without antialiasing'}")
    return (None, others) if others else (plan, [])


def _axis_weights(start: torch.Tensor, length: torch.Tensor, full: torch.Tensor, offset: torch.Tensor,
                  flip: torch.Tensor, reverse: torch.Tensor, extent: torch.Tensor, out: int, canvas: int,
                  interpolation: Any) -> torch.Tensor:
    """(N, out, canvas) weights: output index i of image n reads canvas index a with weight w[n, i, a].

    Per image: source range [start, start + length) resized to `full` samples, of which out samples from
    `offset` are kept, in reverse order if `flip`; `reverse`: the source axis runs backwards over the image's
    `extent` (a half or quarter turn). As ATen's antialiased weights: centre = scale * (i + 0.5), taps from
    trunc(centre - support + 0.5) to trunc(centre + support + 0.5), filter((tap - centre + 0.5) / max(scale, 1)),
    normalized."""
    kernel, support = KERNELS[interpolation]
    device = start.device
    i = torch.arange(out, device=device, dtype=torch.float64).expand(len(start), out)
    i = torch.where(flip[:, None], out - 1 - i, i) + offset[:, None]
    scale = (length / full)[:, None]
    centre = scale * (i + 0.5)  # in the source range's coordinates
    widen = scale.clamp(min=1.0)
    lo = torch.trunc(centre - support * widen + 0.5).clamp(min=0)
    hi = torch.minimum(torch.trunc(centre + support * widen + 0.5), length[:, None])
    # The (N, out, canvas) tensors in float32 (integers and centres far below 2**24); the tap range above was
    # found in float64, as ATen does.
    a = torch.arange(canvas, device=device, dtype=torch.float64).expand(len(start), canvas)
    tap = (torch.where(reverse[:, None], extent[:, None] - 1 - a, a) - start[:, None]).float()[:, None, :]
    inside = (a < extent[:, None]).unsqueeze(1) & (tap >= lo.float()[..., None]) & (tap < hi.float()[..., None])
    x = (tap - centre.float()[..., None] + 0.5) / widen.float()[..., None]
    weights = kernel(x) * inside
    total = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(total == 0, torch.ones_like(total), total)


def pack(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, C, H_max, W_max) of (C, H, W) images, zero-padded at the bottom and right: one stack when all have one
    size, else one nested-tensor padding (both single calls, no per-image step)."""
    if len({tuple(image.shape) for image in images}) == 1:
        return torch.stack(list(images))
    with warnings.catch_warnings():  # torch calls strided nested tensors a prototype; padding is all we use
        warnings.simplefilter("ignore", UserWarning)
        return torch.nested.nested_tensor(list(images)).to_padded_tensor(0)


def resample(images: Sequence[torch.Tensor], params: torch.Tensor, plan: ResamplePlan,
             max_bytes: int = 1 << 30) -> torch.Tensor:
    """uint8 (N, C, *plan.size): each (C, H, W) uint8 image turned, cropped, resized and flipped by its row of
    `params` (N, PARAMS; on the CPU, where the workers drew them), rounded to 8 bits between and after the two
    passes as torchvision's uint8 kernels do. The batch is split only when the float copy of the padded images
    would exceed `max_bytes`."""
    device = images[0].device
    turns = [int(t) % 4 for t in params[:, TURNS].tolist()]
    # A quarter turn is the transpose with its rows (one turn) or columns (three turns) read backwards, so an
    # odd number of turns reads the transposed image (a view), and every image's rows then give the output's
    # rows: one resize per axis, whatever the turn.
    images = [image.transpose(-2, -1) if t % 2 else image for image, t in zip(images, turns)]
    p = params.to(device=device, dtype=torch.float64, non_blocking=True)
    extent = torch.tensor([image.shape[-2:] for image in images], dtype=torch.float64).to(device, non_blocking=True)
    reverse_rows = torch.tensor([t in (1, 2) for t in turns]).to(device, non_blocking=True)
    reverse_cols = torch.tensor([t in (2, 3) for t in turns]).to(device, non_blocking=True)
    canvas_h, canvas_w = max(image.shape[-2] for image in images), max(image.shape[-1] for image in images)
    out_h, out_w = plan.size
    rows = _axis_weights(p[:, Y0], p[:, YLEN], p[:, YFULL], p[:, YOFF], p[:, VFLIP] > 0, reverse_rows,
                         extent[:, 0], out_h, canvas_h, plan.interpolation)
    cols = _axis_weights(p[:, X0], p[:, XLEN], p[:, XFULL], p[:, XOFF], p[:, HFLIP] > 0, reverse_cols,
                         extent[:, 1], out_w, canvas_w, plan.interpolation)
    chunk = max(1, max_bytes // (images[0].shape[0] * canvas_h * canvas_w * 4))
    outputs = []
    for first in range(0, len(images), chunk):  # one pass unless the batch is huge
        part = pack(images[first:first + chunk]).float()
        n, channels = part.shape[:2]
        # Columns first, rounded to 8 bits between the passes, as torchvision's uint8 kernels do (it matters where
        # bicubic overshoots: the second pass sees the clamped first one). Batched over images only, channels
        # folded into the rows, so no weight matrix is repeated per channel.
        across = torch.bmm(part.view(n, channels * canvas_h, canvas_w), cols[first:first + chunk].transpose(1, 2))
        across = across.round_().clamp_(0, 255).view(n, channels, canvas_h, out_w)
        down = torch.bmm(rows[first:first + chunk], across.transpose(1, 2).reshape(n, canvas_h, channels * out_w))
        outputs.append(down.view(n, out_h, channels, out_w).transpose(1, 2))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return out.round_().clamp_(0, 255).to(torch.uint8)


__all__ = ["ResamplePlan", "plan_pipeline", "resample", "pack", "resized_size", "PARAMS", "PER_PIXEL"]
