"""Encoded images (PNG, JPEG) into a model's input tensor, as its manifest's ImageInput says.

Decoded with Pillow, in a worker thread (``ImageDecoder``): decoding and resizing grow with the
image, and nothing that does may run on the event loop. The pixel count is read from the file's
header and bounded before a pixel is decoded, so a small file that claims a huge image (a
decompression bomb) costs next to nothing and gets 413. The export's calibration images go
through ``to_tensor`` too: the server applies exactly the preprocessing the checks ran on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.backends import Array
from service.errors import InvalidInput, PayloadTooLarge
from service.store import ImageInput

FORMATS = ("PNG", "JPEG")
# Modes Pillow converts to L and RGB as 0..255 values; I;16 or F would be clipped to 255.
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})


@dataclass(frozen=True)
class EncodedImages:
    """A request's images as sent (PNG or JPEG files), for the model's image input."""

    files: list[bytes]


def to_tensor(image: Image.Image, spec: ImageInput) -> Array:
    """One opened image as the model's input: converted, resized, scaled, normalized, laid out
    as the manifest says."""
    height, width = spec.size
    channels = spec.channel_count()
    converted = image.convert("L" if spec.channels == "L" else "RGB")
    resized = converted.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized, dtype=np.float32).reshape(height, width, channels)
    if spec.channels == "BGR":
        pixels = pixels[:, :, ::-1]
    hwc = pixels * np.float32(spec.scale)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    normalized = (hwc - mean) / std  # per channel, on the last axis
    laid_out = normalized if spec.layout == "HWC" else normalized.transpose(2, 0, 1)
    tensor: Array = np.ascontiguousarray(laid_out, dtype=np.float32)
    return tensor


def decode(data: bytes, spec: ImageInput, max_pixels: int, setting: str, index: int = 0) -> Array:
    """``data`` (a PNG or JPEG file) as the model's input tensor; 413 past ``max_pixels``
    (named by ``setting``), 400 for anything that is not such an image."""
    which = f"image {index}"
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb guard warns (or raises) from 89M pixels; ours is the bound.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        # Pillow's own guard: it refuses at open what claims over twice its limit (179M).
        raise PayloadTooLarge(
            f"{which} claims over {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels, over {setting}: "
            "send it smaller"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise InvalidInput(f"{which} is not a PNG or JPEG image") from None
    with image:
        if image.mode not in EIGHT_BIT_MODES:
            raise InvalidInput(
                f"{which} has pixels of mode {image.mode} (16-bit or float): send 8 bits a "
                "channel (grey, RGB, RGBA or palette)"
            )
        width, height = image.size
        if width * height > max_pixels:
            raise PayloadTooLarge(
                f"{which} is {width}x{height} pixels, over {setting}: send it smaller"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return to_tensor(image, spec)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InvalidInput(f"{which} cannot be decoded ({type(exc).__name__})") from None


class ImageDecoder:
    """Decodes the images of requests off the event loop, a few at a time."""

    def __init__(self, max_pixels: int, setting: str, threads: int) -> None:
        self._max_pixels = max_pixels
        self._setting = setting
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, threads), thread_name_prefix="foldserve-images"
        )

    async def rows(self, images: Sequence[bytes], spec: ImageInput) -> Array:
        """One row (the model's input tensor) per image, in order."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._decode_all, images, spec)

    def _decode_all(self, images: Sequence[bytes], spec: ImageInput) -> Array:
        rows: Array = np.empty((len(images), *spec.shape()), dtype=np.float32)
        for index, data in enumerate(images):  # into place: no second copy of the batch
            rows[index] = decode(data, spec, self._max_pixels, self._setting, index)
        return rows

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
