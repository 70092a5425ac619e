"""data.decode=gpu: the workers only read JPEG files; the GPU decodes them in batches (nvJPEG) and transforms them.

On a lent H100 with 16 CPU workers, JPEG decode + random resized crop reached about 3,800 img/s, slower than
resnet50 fine-tuning consumes images; nvJPEG decode + resize on the GPU reached about 14,900 img/s.

The transforms are the same v2 pipelines as data.decode=cpu (data/transforms.py), applied to each decoded image
on the device; the trailing per-pixel steps (to float, normalize) run once on the stacked batch. Files that
nvJPEG cannot take (PNG and other formats, CMYK JPEGs) are decoded by the worker on the CPU, as with
data.decode=cpu, and only transformed on the device; a JPEG that fails on the device is retried with the CPU
decoder before it counts as unreadable.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from transfer_cli.data.images import BadImage, describe_error, load_rgb

log = logging.getLogger("transfer_cli")

_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
_NVJPEG_MODES = ("RGB", "L")  # colour spaces nvJPEG turns into RGB; CMYK/YCCK JPEGs go through the CPU decoder
# Steps that act on each pixel alone: the same on a stacked batch as image by image, and cheaper there.
_PER_PIXEL = (v2.ToImage, v2.ToDtype, v2.Normalize, v2.ToPureTensor)


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

    def payload(self, i: int) -> torch.Tensor:
        """Image i's JPEG bytes (1-D, as decode_jpeg takes them) or its (3, H, W) pixels."""
        chunk = self.data[self.offsets[i] : self.offsets[i + 1]]
        return chunk.view(self.shapes[i]) if self.shapes[i] else chunk


def read_encoded(path: str) -> Tuple[torch.Tensor, int]:
    """(JPEG bytes, EXIF orientation) for nvJPEG, or (decoded RGB pixels, 0) for anything else."""
    with open(path, "rb") as f:
        data = f.read()
    # A JPEG cut short (no end-of-image marker) goes to PIL, which rejects it as data.decode=cpu does, where
    # libjpeg and nvJPEG might return a partly grey image.
    if data[:3] == _JPEG_MAGIC and data.rstrip(b"\x00")[-2:] == _JPEG_END:
        with Image.open(io.BytesIO(data)) as img:  # parses the header only: colour mode and EXIF
            if img.mode in _NVJPEG_MODES:
                try:
                    orientation = int(img.getexif().get(0x0112, 1))
                except Exception:  # a corrupt EXIF block should not cost a decodable image (as in load_rgb)
                    orientation = 1
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation if 1 <= orientation <= 8 else 1
    return F.pil_to_tensor(load_rgb(path)), 0


class EncodedImageDataset:
    """Map-style dataset of (path, label) samples: `(bytes or pixels, orientation, label, path)`, or a BadImage."""

    def __init__(self, samples: Sequence[Tuple[str, Any]]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            payload, orientation = read_encoded(path)
        except Exception as e:  # vanished, unreadable, undecodable non-JPEG: never kill the worker
            return BadImage(path, describe_error(e))
        return payload, orientation, label, path


def collate_encoded(
    items: Sequence[Any], augment: bool, collate_labels: Optional[Callable[[List[Any]], torch.Tensor]] = None
) -> EncodedBatch:
    """`collate_labels`: turns the batch's labels into the target tensor (default: class indices, int64)."""
    good = [it for it in items if not isinstance(it, BadImage)]
    bad = [(it.path, it.reason) for it in items if isinstance(it, BadImage)]
    label_list = [it[2] for it in good]
    labels = collate_labels(label_list) if collate_labels is not None else torch.tensor(label_list, dtype=torch.long)
    payloads = [it[0] for it in good]
    offsets = [0]
    for payload in payloads:
        offsets.append(offsets[-1] + payload.numel())
    return EncodedBatch(
        data=torch.cat([p.reshape(-1) for p in payloads]) if payloads else torch.empty(0, dtype=torch.uint8),
        offsets=offsets,
        shapes=[() if it[1] > 0 else tuple(it[0].shape) for it in good],
        orientations=[it[1] for it in good],
        labels=labels,
        paths=[it[3] for it in good],
        bad=bad,
        augment=augment,
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
    while cut > 0 and isinstance(steps[cut - 1], _PER_PIXEL):
        cut -= 1
    return v2.Compose(steps[:cut]), v2.Compose(steps[cut:])


def _decode_jpegs(payloads: List[torch.Tensor], device: torch.device) -> List[Optional[torch.Tensor]]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
        try:
            return list(decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad file fails the whole batch: find it image by image
            out: List[Optional[torch.Tensor]] = []
            for data in payloads:
                try:
                    out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


class DeviceDecoder:
    """Turns an EncodedBatch into normalized (N, 3, H, W) float32 images on `device`, dropping unreadable files."""

    def __init__(self, transforms: Dict[bool, Callable], image_shape: Sequence[int], device: Any):
        self.pipelines = {augment: split_pipeline(t) for augment, t in transforms.items()}
        self.image_shape = tuple(int(v) for v in image_shape)
        self.device = torch.device(device)

    @classmethod
    def for_transforms(cls, transforms: Any, device: Any) -> "DeviceDecoder":
        """The decoder of a run's data/transforms.py Transforms (train and eval pipelines) on `device`."""
        return cls({True: transforms.train, False: transforms.eval}, transforms.image_shape, device)

    def decode(self, batch: EncodedBatch, device: Any = None) -> Tuple[torch.Tensor, torch.Tensor, List[Tuple[str, str]]]:
        """(images, labels, bad): `bad` lists the worker's failures and the files no decoder could read."""
        device = torch.device(device) if device is not None else self.device
        jpeg = [i for i, o in enumerate(batch.orientations) if o > 0]
        decoded = _decode_jpegs([batch.payload(i) for i in jpeg], device) if jpeg else []
        images: List[Optional[torch.Tensor]] = [
            None if o > 0 else batch.payload(i) for i, o in enumerate(batch.orientations)
        ]
        for i, image in zip(jpeg, decoded):
            images[i] = image if image is None else apply_orientation(image, batch.orientations[i])
        bad = list(batch.bad)
        for i, image in enumerate(images):
            if image is None:  # nvJPEG refused it; PIL decodes what libjpeg can, as data.decode=cpu would
                try:
                    images[i] = F.pil_to_tensor(load_rgb(batch.paths[i]))
                except Exception as e:
                    bad.append((batch.paths[i], describe_error(e)))
        per_image, per_batch = self.pipelines[bool(batch.augment)]
        keep = [i for i, image in enumerate(images) if image is not None]
        if not keep:
            empty = torch.empty((0, *self.image_shape), dtype=torch.float32, device=device)
            return empty, batch.labels[:0], bad
        stacked = torch.stack([per_image(images[i].to(device, non_blocking=True)) for i in keep])
        out = per_batch(stacked).as_subclass(torch.Tensor)
        labels = batch.labels if len(keep) == len(images) else batch.labels[torch.tensor(keep, dtype=torch.long)]
        return out, labels, bad


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
    log.info("data.decode=gpu: JPEG files are decoded with nvJPEG on %s; other formats by the CPU workers", device)
    return device


__all__ = [
    "EncodedBatch", "EncodedImageDataset", "DeviceDecoder", "collate_encoded", "read_encoded", "apply_orientation",
    "split_pipeline", "resolve_decode",
]
