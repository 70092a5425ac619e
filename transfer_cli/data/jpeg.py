"""Decoding a batch of JPEG files on a device in one call: TorchCodec when it is installed, else torchvision.

Both hand a list of encoded images to nvJPEG's batched decoder on CUDA (one call per batch; the CPU path loops in
C++). TorchCodec (`pip install transfer-cli[gpu-decode]`) is preferred: torchvision 0.29 deprecates its image
decoding in favour of it, it applies EXIF orientation itself (also on the GPU), and it keeps a pool of decoders
per GPU where torchvision has one behind a lock. torchvision's stays the fallback while it exists.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Callable, List, NamedTuple, Optional

import torch

log = logging.getLogger("transfer_cli")


class JpegEngine(NamedTuple):
    name: str
    decode_list: Callable[[List[torch.Tensor], torch.device], List[torch.Tensor]]  # raises on any bad file
    decode_one: Callable[[torch.Tensor, torch.device], torch.Tensor]
    upright: bool  # applies EXIF orientation itself

    def decode(self, payloads: List[torch.Tensor], device: torch.device) -> List[Optional[torch.Tensor]]:
        """RGB uint8 (3, H, W) images on `device`; None for a file the engine cannot decode."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            try:
                return list(self.decode_list(payloads, device))
            except RuntimeError:  # one bad file fails the whole batch: find it image by image
                out: List[Optional[torch.Tensor]] = []
                for data in payloads:
                    try:
                        out.append(self.decode_one(data, device))
                    except RuntimeError:
                        out.append(None)
                return out


def _torchcodec() -> JpegEngine:
    from torchcodec.decoders import decode_jpeg

    return JpegEngine("torchcodec", lambda items, device: decode_jpeg(items, mode="RGB", device=device),
                      lambda data, device: decode_jpeg(data, mode="RGB", device=device), upright=True)


def _torchvision() -> JpegEngine:
    from torchvision.io import ImageReadMode, decode_jpeg

    return JpegEngine("torchvision", lambda items, device: decode_jpeg(items, mode=ImageReadMode.RGB, device=device),
                      lambda data, device: decode_jpeg(data, mode=ImageReadMode.RGB, device=device), upright=False)


@functools.lru_cache(maxsize=None)
def jpeg_engine(prefer: str = "torchcodec") -> JpegEngine:
    """The engine data.decode=gpu uses: `prefer` when it imports, else torchvision."""
    if prefer == "torchcodec":
        try:
            return _torchcodec()
        except (ImportError, OSError, RuntimeError) as e:  # not installed, or its libraries do not load
            log.debug("torchcodec unavailable (%s): torchvision decodes the JPEGs", e)
    return _torchvision()


__all__ = ["JpegEngine", "jpeg_engine"]
