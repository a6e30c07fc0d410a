"""Image sanitising: turn whatever a dataset holds into RGB baseline JPEG bytes, or say why not.

Real datasets contain CMYK and grayscale JPEGs, PNG or GIF bytes behind a ``.JPEG`` name,
progressive JPEGs, truncated and zero-byte files. Everything is detected by decoding the bytes,
never by file name. Valid RGB baseline JPEGs pass through byte-for-byte unless a resize is asked for.

One image is the same pixels everywhere (docs/DATASETS.md, "Image kinds"): ``to_rgb`` is the one
definition of an image's RGB pixels, and ``sanitize`` (which uses it) is what the converter stores
and what ``mile-predict`` decodes its input files through. It applies the EXIF orientation (stored
JPEGs then carry none, so no decoder rotates them differently), scales 16-bit pixels to 8 bits,
composites transparency over white, keeps the first frame of an animation, and refuses kinds with
no faithful 8-bit form (floating-point and 32-bit integer pixels). ``open_image`` holds the
decompression-bomb guard every caller shares.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that shows the image upright (the EXIF 2.3 table, as Pillow's
# ImageOps.exif_transpose applies it).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE = (255, 255, 255, 255)
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
    image = open_image(data)
    rgb = to_rgb(image)
    repair = _repair_reason(data, image, rgb.changes)
    resized = policy.max_side_px is not None and max(rgb.image.size) > policy.max_side_px
    if repair is None and not resized:
        return CleanImage(data, None, False, *image.size)
    out = _shrink(rgb.image, policy.max_side_px) if policy.max_side_px is not None and resized else rgb.image
    return CleanImage(encode_jpeg(out, policy.quality), repair, resized, *out.size)


@dataclass(frozen=True)
class RgbImage:
    """An image's upright 8-bit RGB pixels, and what ``to_rgb`` did beyond decoding (empty: nothing)."""

    image: Image.Image  # mode RGB
    changes: tuple[str, ...]


# Raster formats a dataset of photos comes in. Pillow would otherwise open every format it knows,
# some through external programs (EPS and PDF through Ghostscript): those are refused unread.
RASTER_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "TGA", "ICO", "JPEG2000")


def _raster_formats() -> list[str]:
    """``RASTER_FORMATS`` that this Pillow has a plugin for (all plugins registered first)."""
    Image.init()
    return [name for name in RASTER_FORMATS if name in Image.OPEN]


def open_image(data: bytes) -> Image.Image:
    """Open and decode every pixel, so truncation is caught here and not in a training run. The
    decompression-bomb guard: an image whose header claims more than Pillow's ``MAX_IMAGE_PIXELS``
    (about 89 million) is refused before any pixel buffer is allocated. Only ``RASTER_FORMATS`` open."""
    if not data:
        raise UnreadableImage("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_raster_formats())
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(f"too many pixels, refused as a possible decompression bomb ({error})") from None
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise UnreadableImage(f"undecodable ({type(error).__name__}: {without_addresses(str(error))})") from None
    if image.width < 1 or image.height < 1:
        raise UnreadableImage(f"empty image {image.width}x{image.height}")
    return image


def to_rgb(image: Image.Image) -> RgbImage:
    """Upright 8-bit RGB pixels of a decoded image (see the module docstring for the rules)."""
    changes: list[str] = []
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        changes.append(f"{frames} frames: the first kept")
    orientation = _orientation(image, changes)
    image = _eight_bit(image, changes)
    image = _opaque(image, changes)
    try:
        rgb = image if image.mode == "RGB" else image.convert("RGB")  # a pass-through JPEG is not copied
    except (ValueError, OSError) as error:
        raise UnreadableImage(f"pixel mode {image.mode} has no RGB conversion ({error})") from None
    if orientation in _UPRIGHT:
        rgb = rgb.transpose(_UPRIGHT[orientation])
    return RgbImage(rgb, tuple(changes))


def _orientation(image: Image.Image, changes: list[str]) -> int:
    """The EXIF orientation (1 = upright, also when there is none). Any other value, valid or not,
    is a change: the image is re-encoded without it, so no decoder can rotate it differently."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # malformed EXIF: Pillow raises many types
        changes.append("unreadable EXIF dropped")
        return 1
    if value == 1:
        return 1
    if isinstance(value, int) and value in _UPRIGHT:
        changes.append(f"EXIF orientation {value} applied")
        return value
    changes.append(f"invalid EXIF orientation {without_addresses(repr(value))[:40]} dropped")
    return 1


def _eight_bit(image: Image.Image, changes: list[str]) -> Image.Image:
    """16-bit gray scaled to 8 bits (65535 -> 255, rounded); pixels with no known scale refused.
    (Pillow reads 16-bit RGB PNGs as 8-bit RGB itself.)"""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and image.format == "PNG"):  # PNG: "I" holds 16 bits
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        changes.append(f"16-bit pixels ({mode}) scaled to 8 bits")
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if mode.startswith("I"):
        raise UnreadableImage(
            f"32-bit integer pixels (mode {mode}) have no known 8-bit scale; save it with 8 or 16 bits per channel"
        )
    if mode.startswith("F"):
        raise UnreadableImage(
            f"floating-point pixels (mode {mode}) have no known 8-bit scale; save it with 8 or 16 bits per channel"
        )
    return image


def _opaque(image: Image.Image, changes: list[str]) -> Image.Image:
    """Transparent pixels composited over white, as a viewer shows them on a white page (the colour
    a transparent pixel happens to hold is not part of the picture)."""
    if image.mode not in _ALPHA_MODES and "transparency" not in image.info:
        return image
    try:
        rgba = image.convert("RGBA")
    except ValueError as error:
        raise UnreadableImage(f"pixel mode {image.mode} has no RGBA conversion ({error})") from None
    lowest_alpha, _ = rgba.getchannel("A").getextrema()
    if lowest_alpha == 255:
        return rgba  # fully opaque: the alpha channel changes nothing
    changes.append("transparency composited over white")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba)


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


def without_addresses(text: str) -> str:
    """``text`` with memory addresses of object reprs removed (``<_io.BytesIO object>``)."""
    return _ADDRESS.sub("", text)


def _repair_reason(data: bytes, image: Image.Image, changes: tuple[str, ...]) -> str | None:
    """Why these bytes cannot be stored as they are, or None when they are upright RGB baseline JPEG."""
    reasons = list(changes)
    if image.format != "JPEG" or not data.startswith(JPEG_MAGIC):
        reasons.insert(0, f"{image.format or 'unknown'} bytes, not JPEG")
    elif image.mode != "RGB":
        reasons.insert(0, f"{image.mode} JPEG, not RGB")
    elif image.info.get("progressive") or image.info.get("progression"):
        reasons.insert(0, "progressive JPEG")
    elif getattr(image, "layers", 3) != 3:
        reasons.insert(0, f"JPEG with {getattr(image, 'layers', 3)} components")
    return "; ".join(reasons) or None


def _shrink(image: Image.Image, max_side_px: int) -> Image.Image:
    scale = max_side_px / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
