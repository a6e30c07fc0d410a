"""Image sanitising: turn whatever a dataset holds into RGB baseline JPEG bytes, or say why not.

Real datasets contain CMYK and grayscale JPEGs, PNG or GIF bytes behind a ``.JPEG`` name,
progressive JPEGs, truncated and zero-byte files. Everything is detected by decoding the bytes,
never by file name. Valid RGB baseline JPEGs pass through byte-for-byte unless a resize is asked for.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

JPEG_MAGIC = b"\xff\xd8\xff"
# " at 0x7f3a..." in object reprs (PIL puts them in messages): an address differs per run, and a
# reason recorded in the manifest must not, or two conversions of one input differ.
_ADDRESS = re.compile(r"\s+at 0x[0-9a-fA-F]+")


class UnreadableImage(Exception):
    """The bytes cannot become an image; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class ImagePolicy:
    """How images are written: pass-through unless ``max_side_px`` asks for a resize."""

    max_side_px: int | None = None
    quality: int = 90

    def __post_init__(self) -> None:
        if self.max_side_px is not None and self.max_side_px < 8:
            raise ValueError(f"max_side_px must be >= 8, got {self.max_side_px}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {self.quality}")


@dataclass(frozen=True)
class CleanImage:
    """Result of sanitising: JPEG bytes, and why they were re-encoded (None = untouched)."""

    jpeg: bytes
    repair: str | None
    resized: bool
    width: int
    height: int


def sanitize(data: bytes, policy: ImagePolicy) -> CleanImage:
    """Return RGB baseline JPEG bytes for ``data`` or raise ``UnreadableImage`` with a reason."""
    if not data:
        raise UnreadableImage("zero-byte file")
    image = _decode_fully(data)
    repair = _repair_reason(data, image)
    max_side_px = policy.max_side_px
    resized = max_side_px is not None and max(image.size) > max_side_px
    if repair is None and not resized:
        return CleanImage(data, None, False, *image.size)
    rgb = image.convert("RGB")
    if max_side_px is not None and resized:
        rgb = _shrink(rgb, max_side_px)
    return CleanImage(encode_jpeg(rgb, policy.quality), repair, resized, *rgb.size)


def encode_array(pixels: np.ndarray, quality: int) -> bytes:
    """Encode an H×W (gray) or H×W×3 uint8 array as an RGB baseline JPEG."""
    image = Image.fromarray(pixels)
    return encode_jpeg(image.convert("RGB"), quality)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    # progressive=False and optimize=False: baseline JPEG, the form every decoder (nvJPEG included)
    # handles on its fast path. subsampling 4:2:0 is what ImageNet's own files use.
    image.save(buffer, format="JPEG", quality=quality, progressive=False, optimize=False, subsampling=2)
    return buffer.getvalue()


def _decode_fully(data: bytes) -> Image.Image:
    """Open and decode every pixel, so truncation is caught here and not in a training run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise UnreadableImage(f"undecodable ({type(error).__name__}: {without_addresses(str(error))})") from None
    if image.width < 1 or image.height < 1:
        raise UnreadableImage(f"empty image {image.width}x{image.height}")
    return image


def without_addresses(text: str) -> str:
    """``text`` with memory addresses of object reprs removed (``<_io.BytesIO object>``)."""
    return _ADDRESS.sub("", text)


def _repair_reason(data: bytes, image: Image.Image) -> str | None:
    """Why these bytes cannot be stored as they are, or None when they are RGB baseline JPEG."""
    if image.format != "JPEG" or not data.startswith(JPEG_MAGIC):
        return f"{image.format or 'unknown'} bytes, not JPEG"
    if image.mode != "RGB":
        return f"{image.mode} JPEG, not RGB"
    if image.info.get("progressive") or image.info.get("progression"):
        return "progressive JPEG"
    layers = getattr(image, "layers", 3)  # JpegImageFile only
    if layers != 3:
        return f"JPEG with {layers} components"
    return None


def _shrink(image: Image.Image, max_side_px: int) -> Image.Image:
    scale = max_side_px / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
