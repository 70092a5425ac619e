"""data.decode=gpu: the workers only read JPEG files; the device decodes each batch in one call and crops,
resizes and flips it as a batch.

On a lent H100 with 16 CPU workers, JPEG decode + random resized crop reached about 3,800 img/s, slower than
resnet50 fine-tuning consumes images; nvJPEG decode + resize on the GPU reached about 14,900 img/s.

Per batch: one batched decode (data/jpeg.py; on CUDA on a side stream, so the engine's stream syncs wait for the
decode only, never for the training step queued before it), then one batched resample (data/resample.py) and
the per-pixel steps (to float, normalize) on the stacked batch. The random parameters (turn, crop box, flips)
are drawn per image in the workers, from the same per-image seed and in the same order as data.decode=cpu, so
both paths augment each image the same way and a resumed run replays them. A pipeline with steps the batched
path does not do (colour jitter, rotation, perspective, RandAugment, ...) is applied image by image on the
device, each image under its own seed from the workers. Files that nvJPEG cannot take (PNG and other formats,
CMYK JPEGs) are decoded by the worker on the CPU, as with data.decode=cpu, and only transformed on the device; a
JPEG that fails on the device is retried with the CPU decoder before it counts as unreadable.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from transfer_cli import seeding
from transfer_cli.data.images import BadImage, describe_error, load_rgb
from transfer_cli.data.jpeg import JpegEngine, jpeg_engine
from transfer_cli.data.resample import PER_PIXEL, ResamplePlan, plan_pipeline, resample

log = logging.getLogger("transfer_cli")

_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
_NVJPEG_MODES = ("RGB", "L")  # colour spaces nvJPEG turns into RGB; CMYK/YCCK JPEGs go through the CPU decoder


class EncodedBatch(NamedTuple):
    """What the loaders yield with data.decode=gpu: file bytes, decoded on the device by `DeviceDecoder`."""

    # Every image's payload back to back in one tensor: one shared-memory handle per batch rather than one per
    # image, which with hundreds of images per batch and many workers would run out of file descriptors.
    data: torch.Tensor  # uint8; image i is data[offsets[i]:offsets[i + 1]]
    offsets: List[int]
    shapes: List[Tuple[int, ...]]  # () for JPEG bytes; (3, H, W) for pixels the worker decoded
    orientations: List[int]  # EXIF orientation 1-8 of each JPEG; 0 for pixels (already upright)
    labels: torch.Tensor
    paths: List[str]  # to name the images that fail to decode on the device
    bad: List[Tuple[str, str]]  # (path, reason) of the files the workers could not read
    augment: bool  # which pipeline applies: the training augmentation or the eval transform
    params: Optional[torch.Tensor] = None  # (N, resample.PARAMS) float64: each image's turn, crop and flips
    seeds: Optional[List[int]] = None  # each image's seed, for a pipeline applied image by image

    def payload(self, i: int) -> torch.Tensor:
        """Image i's JPEG bytes (1-D, as decode_jpeg takes them) or its (3, H, W) pixels."""
        chunk = self.data[self.offsets[i] : self.offsets[i + 1]]
        return chunk.view(self.shapes[i]) if self.shapes[i] else chunk


class Encoded(NamedTuple):
    payload: torch.Tensor  # JPEG bytes (1-D uint8), or the decoded (3, H, W) pixels
    orientation: int  # EXIF orientation 1-8 of a JPEG; 0 for pixels (already upright)
    height: int  # of the upright image
    width: int


def read_encoded(path: str) -> Encoded:
    """JPEG bytes with their EXIF orientation, for nvJPEG; or decoded RGB pixels (orientation 0) for anything
    else. Either way the upright image's size, from the header."""
    with open(path, "rb") as f:
        data = f.read()
    # A JPEG cut short (no end-of-image marker) goes to PIL, which rejects it as data.decode=cpu does, where
    # libjpeg and nvJPEG might return a partly grey image.
    if data[:3] == _JPEG_MAGIC and data.rstrip(b"\x00")[-2:] == _JPEG_END:
        with Image.open(io.BytesIO(data)) as img:  # parses the header only: colour mode, size and EXIF
            if img.mode in _NVJPEG_MODES:
                try:
                    orientation = int(img.getexif().get(0x0112, 1))
                except Exception:  # a corrupt EXIF block should not cost a decodable image (as in load_rgb)
                    orientation = 1
                orientation = orientation if 1 <= orientation <= 8 else 1
                width, height = img.size
                if orientation >= 5:  # 5-8 turn the image a quarter
                    width, height = height, width
                return Encoded(torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation, height, width)
    pixels = F.pil_to_tensor(load_rgb(path))
    return Encoded(pixels, 0, int(pixels.shape[-2]), int(pixels.shape[-1]))


class EncodedImageDataset:
    """Map-style dataset of (path, label) samples: `(Encoded, label, path, params, seed)`, or a BadImage.

    `plan`: the batched resample the device applies; each image's random parameters are drawn here, under the
    caller's seeded RNG (data/seeded.py wraps the training set). `seeds`: instead, draw a seed for the device to
    apply the pipeline image by image with."""

    def __init__(self, samples: Sequence[Tuple[str, Any]], plan: Optional[ResamplePlan] = None, seeds: bool = False):
        self.samples = list(samples)
        self.plan = plan
        self.seeds = seeds

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            encoded = read_encoded(path)
        except Exception as e:  # vanished, unreadable, undecodable non-JPEG: never kill the worker
            return BadImage(path, describe_error(e))
        params = self.plan.draw(encoded.height, encoded.width) if self.plan is not None else None
        seed = int(torch.randint(0, 2**62, ())) if self.seeds else None
        return encoded, label, path, params, seed


def collate_encoded(
    items: Sequence[Any], augment: bool, collate_labels: Optional[Callable[[List[Any]], torch.Tensor]] = None
) -> EncodedBatch:
    """`collate_labels`: turns the batch's labels into the target tensor (default: class indices, int64)."""
    good = [it for it in items if not isinstance(it, BadImage)]
    bad = [(it.path, it.reason) for it in items if isinstance(it, BadImage)]
    label_list = [it[1] for it in good]
    labels = collate_labels(label_list) if collate_labels is not None else torch.tensor(label_list, dtype=torch.long)
    payloads = [it[0].payload for it in good]
    offsets = [0]
    for payload in payloads:
        offsets.append(offsets[-1] + payload.numel())
    params = [it[3] for it in good]
    return EncodedBatch(
        data=torch.cat([p.reshape(-1) for p in payloads]) if payloads else torch.empty(0, dtype=torch.uint8),
        offsets=offsets,
        shapes=[() if it[0].orientation > 0 else tuple(it[0].payload.shape) for it in good],
        orientations=[it[0].orientation for it in good],
        labels=labels,
        paths=[it[2] for it in good],
        bad=bad,
        augment=augment,
        params=torch.tensor(params, dtype=torch.float64) if params and params[0] is not None else None,
        seeds=[it[4] for it in good] if good and good[0][4] is not None else None,
    )


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turn a (C, H, W) image as EXIF orientation 1-8 says, as PIL's ImageOps.exif_transpose does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def split_pipeline(transform: Callable) -> Tuple[Callable, Callable]:
    """(per-image part, batch part) of a v2 pipeline: the batch part is its trailing run of per-pixel steps."""
    steps = list(getattr(transform, "transforms", [transform]))
    cut = len(steps)
    while cut > 0 and isinstance(steps[cut - 1], PER_PIXEL):
        cut -= 1
    return v2.Compose(steps[:cut]), v2.Compose(steps[cut:])


class DeviceDecoder:
    """Turns an EncodedBatch into normalized (N, 3, H, W) float32 images on `device`, dropping unreadable files.

    `transforms`: {augment: the v2 pipeline}; each is applied as one batched resample where it can be
    (`plans`), else image by image (`pipelines`)."""

    def __init__(self, transforms: Dict[bool, Callable], image_shape: Sequence[int], device: Any,
                 engine: Optional[JpegEngine] = None):
        self.pipelines = {augment: split_pipeline(t) for augment, t in transforms.items()}
        planned = {augment: plan_pipeline(t) for augment, t in transforms.items()}
        self.plans: Dict[bool, Optional[ResamplePlan]] = {augment: p for augment, (p, _) in planned.items()}
        self.unbatched: Dict[bool, List[str]] = {augment: steps for augment, (_, steps) in planned.items()}
        self.image_shape = tuple(int(v) for v in image_shape)
        self.device = torch.device(device)
        self.engine = engine or jpeg_engine()
        self._streams: Dict[torch.device, Any] = {}

    @classmethod
    def for_transforms(cls, transforms: Any, device: Any) -> "DeviceDecoder":
        """The decoder of a run's data/transforms.py Transforms (train and eval pipelines) on `device`."""
        return cls({True: transforms.train, False: transforms.eval}, transforms.image_shape, device)

    def describe(self) -> str:
        """One line for the log: the engine, and which pipelines are batched."""
        parts = [f"JPEGs decoded by {self.engine.name} on {self.device}"]
        for augment, name in ((True, "training augmentation"), (False, "evaluation transform")):
            if self.plans.get(augment) is not None:
                parts.append(f"the {name} batched on the device")
            elif augment in self.plans:
                parts.append(f"the {name} image by image on the device, because the batched path does not do "
                             f"{', '.join(self.unbatched[augment])}")
        return "; ".join(parts)

    def dataset(self, samples: Sequence[Tuple[str, Any]], augment: bool) -> EncodedImageDataset:
        """What the workers read for `samples`: bytes, plus each image's parameters or seed."""
        plan = self.plans[bool(augment)]
        return EncodedImageDataset(samples, plan=plan, seeds=plan is None and bool(augment))

    @contextlib.contextmanager
    def _decode_stream(self, device: torch.device) -> Iterator[None]:
        """On CUDA, decode on a side stream: the engines synchronize the stream they decode on, which must not be
        the one the training step is queued on."""
        if device.type != "cuda":
            yield
            return
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        with torch.cuda.stream(self._streams[device]):
            yield
        torch.cuda.current_stream(device).wait_stream(self._streams[device])

    def _decode_jpegs(self, payloads: List[torch.Tensor], device: torch.device) -> List[Optional[torch.Tensor]]:
        with self._decode_stream(device):
            decoded = self.engine.decode(payloads, device)
        if device.type == "cuda":  # made on the side stream, used on the current one
            current = torch.cuda.current_stream(device)
            for image in decoded:
                if image is not None:
                    image.record_stream(current)
        return decoded

    def decode(self, batch: EncodedBatch, device: Any = None) -> Tuple[torch.Tensor, torch.Tensor, List[Tuple[str, str]]]:
        """(images, labels, bad): `bad` lists the worker's failures and the files no decoder could read."""
        device = torch.device(device) if device is not None else self.device
        jpeg = [i for i, o in enumerate(batch.orientations) if o > 0]
        decoded = self._decode_jpegs([batch.payload(i) for i in jpeg], device) if jpeg else []
        images: List[Optional[torch.Tensor]] = [
            None if o > 0 else batch.payload(i) for i, o in enumerate(batch.orientations)
        ]
        for i, image in zip(jpeg, decoded):
            upright = image is None or self.engine.upright or batch.orientations[i] == 1
            images[i] = image if upright else apply_orientation(image, batch.orientations[i])
        bad = list(batch.bad)
        for i, image in enumerate(images):
            if image is None:  # nvJPEG refused it; PIL decodes what libjpeg can, as data.decode=cpu would
                try:
                    images[i] = F.pil_to_tensor(load_rgb(batch.paths[i]))
                except Exception as e:
                    bad.append((batch.paths[i], describe_error(e)))
        keep = [i for i, image in enumerate(images) if image is not None]
        if not keep:
            empty = torch.empty((0, *self.image_shape), dtype=torch.float32, device=device)
            return empty, batch.labels[:0], bad
        pixels = [images[i].to(device, non_blocking=True) for i in keep]  # a no-op for the device-decoded
        augment = bool(batch.augment)
        plan = self.plans[augment]
        if plan is not None and batch.params is not None:
            out = plan.tail(resample(pixels, batch.params[keep], plan))
        else:
            per_image, per_batch = self.pipelines[augment]
            seeds = batch.seeds
            out = per_batch(torch.stack([_seeded(per_image, image, seeds[i] if seeds else None)
                                         for i, image in zip(keep, pixels)]))
        labels = batch.labels if len(keep) == len(images) else batch.labels[torch.tensor(keep, dtype=torch.long)]
        return out.as_subclass(torch.Tensor), labels, bad


def _seeded(transform: Callable, image: torch.Tensor, seed: Optional[int]) -> torch.Tensor:
    if seed is None:
        return transform(image)
    with seeding.torch_seeded(seed):
        return transform(image)


def resolve_decode(setting: str, device: torch.device) -> Optional[torch.device]:
    """The device that decodes with data.decode=gpu, or None for the CPU workers (data.decode=cpu, no GPU)."""
    if str(setting) != "gpu":
        return None
    if device.type != "cuda":
        log.warning(
            "data.decode=gpu needs a CUDA device, but this run trains on %s: the data-loader workers decode the "
            "images on the CPU instead (data.decode=cpu)", device.type,
        )
        return None
    return device


__all__ = [
    "Encoded", "EncodedBatch", "EncodedImageDataset", "DeviceDecoder", "collate_encoded", "read_encoded",
    "apply_orientation", "split_pipeline", "resolve_decode",
]
