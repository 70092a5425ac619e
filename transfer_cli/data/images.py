"""Image decoding that never takes a data-loader worker down with it.

Real folders hold grayscale scans, 16-bit TIFFs, palette PNGs with transparency, CMYK JPEGs and the odd file
cut short by a failed copy. Everything decodable comes out as 8-bit RGB; everything else is reported as a
`BadImage` marker (or listed by `scan_images`), and the data module decides whether the run can go on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

from transfer_cli.errors import TransferError


class BadImage(NamedTuple):
    """Returned by `ImageDataset.__getitem__` in place of `(tensor, label)` when the file cannot be decoded."""

    path: str
    reason: str


def describe_error(e: BaseException) -> str:
    """An exception as one line for logs and bad_images.txt: its type and message, tabs and newlines removed."""
    return f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")


def _to_uint8(arr: np.ndarray, full_scale: Optional[float]) -> np.ndarray:
    arr = arr.astype(np.float64)
    if full_scale is None:  # unknown range (32-bit int/float): stretch to the image's own min..max
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    else:
        arr = arr * (255.0 / full_scale)
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    # PIL's own convert("RGB") clips 16-bit values at 255 instead of scaling them, turning most 16-bit scans
    # into a white image; scale by the type's range instead.
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        full: Optional[float] = 65535.0
    elif img.mode == "F" and arr.size and 0.0 <= arr.min() and arr.max() <= 1.0:
        full = 1.0
    elif arr.size and 0 <= arr.min() and arr.max() <= 255:
        full = 255.0
    elif img.mode == "I" and arr.size and 0 <= arr.min() and arr.max() <= 65535:
        full = 65535.0  # Pillow opens 16-bit grayscale PNGs as mode I
    else:
        full = None
    return Image.fromarray(_to_uint8(arr, full), mode="L")


def load_rgb(path: str) -> Image.Image:
    """Decode `path` fully into an 8-bit RGB image; raises (OSError, ValueError, ...) when it cannot.

    Transparency is composited onto black rather than dropped: pixels with alpha 0 often hold arbitrary colour
    (whatever the editor left there) that nobody sees when labelling, and compositing turns that into a constant.
    Black rather than white because that is what premultiplied alpha stores for a transparent pixel.
    EXIF orientation is applied so the network sees the image the way the person who labelled it did.
    """
    with Image.open(path) as img:
        img.load()  # decode now, inside the caller's try block, not lazily in a transform
        try:
            if img.getexif().get(0x0112, 1) != 1:  # 0x0112: Orientation; checked first to skip a copy
                img = ImageOps.exif_transpose(img)
        except Exception:  # a corrupt EXIF block should not cost a decodable image
            pass
        mode = img.mode
        if mode == "RGB":
            return img.copy()
        if mode in ("I", "F") or mode.startswith("I;16"):
            return _high_depth_to_l(img).convert("RGB")
        if mode == "P" and "transparency" in img.info:
            img, mode = img.convert("RGBA"), "RGBA"
        if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _header_problem(path: str) -> Optional[str]:
    try:
        with Image.open(path) as img:  # reads the header only; pixel data is decoded lazily
            w, h = img.size
            if w <= 0 or h <= 0:
                return f"empty image ({w}x{h})"
    except FileNotFoundError:
        return "file not found"
    except Exception as e:  # UnidentifiedImageError, PermissionError, DecompressionBombError, ...
        return describe_error(e)
    return None


def format_bad(bad: Sequence[Tuple[str, str]], limit: int = 20) -> str:
    lines = [f"    {p}: {r}" for p, r in list(bad)[:limit]]
    if len(bad) > limit:
        lines.append(f"    ... and {len(bad) - limit} more")
    return "\n".join(lines)


def scan_images(samples: Iterable[Union[str, Tuple[str, Any]]], budget: int) -> List[Tuple[str, str]]:
    """(path, reason) for each image whose header cannot be read; raises when there are more than `budget`.

    A cheap first pass (about a millisecond per file): it catches missing, non-image and zero-sized files
    before training starts. Files truncated after their header only show up when decoded, in the loaders.
    """
    bad: List[Tuple[str, str]] = []
    seen = set()
    for s in samples:
        path = s if isinstance(s, str) else s[0]
        if path in seen:
            continue
        seen.add(path)
        problem = _header_problem(path)
        if problem is not None:
            bad.append((path, problem))
    if len(bad) > budget:
        raise TransferError(
            f"{len(bad)} unreadable image(s), more than data.max_bad_images={budget}:\n{format_bad(bad)}",
            f"remove or repair those files, or allow more: data.max_bad_images={len(bad)}",
        )
    return bad


class BadImages:
    """The images a run could not read: listed in a log file as they are found, fatal past a budget.

    Unreadable images are skipped rather than fatal, up to `budget` (data.max_bad_images), so one broken file in
    a large folder does not cost a run; each is listed so the user can repair the data set, and one too many
    stops the run with the full list.
    """

    def __init__(self, budget: int, log: Optional[Path] = None):
        self.budget = int(budget)
        self.log = Path(log) if log is not None else None
        self._found: Dict[str, str] = {}  # path -> reason; a dict, so a set that keeps first-seen order

    @property
    def items(self) -> List[Tuple[str, str]]:
        return list(self._found.items())

    def record(self, bad: Sequence[Tuple[str, str]]) -> None:
        """Remember newly failed images, append them to the log, and stop once there are too many."""
        new = [(str(p), str(r)) for p, r in bad if str(p) not in self._found]
        if new:
            self._found.update(new)
            if self.log is not None:
                self.log.parent.mkdir(parents=True, exist_ok=True)
                with open(self.log, "a", encoding="utf-8") as f:
                    f.writelines(f"{p}\t{r}\n" for p, r in new)
        if len(self._found) > self.budget:
            where = f" (listed in {self.log})" if self.log is not None else ""
            raise TransferError(
                f"{len(self._found)} unreadable image(s){where}, more than "
                f"data.max_bad_images={self.budget}:\n{format_bad(self.items)}",
                f"remove or repair those files, or allow more: data.max_bad_images={len(self._found)}",
            )


class ImageDataset:
    """Map-style dataset of (path, label) samples: `(transform(image), label)`, or a `BadImage` marker."""

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Optional[Callable] = None):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            img = load_rgb(path)
        except Exception as e:  # truncated, corrupt, vanished since setup, too large: never kill the worker
            return BadImage(path, describe_error(e))
        # Outside the try: a transform failing on a decoded RGB image is a bug and should surface.
        return (self.transform(img) if self.transform is not None else img), label


__all__ = ["BadImage", "BadImages", "ImageDataset", "load_rgb", "scan_images", "format_bad", "describe_error"]
