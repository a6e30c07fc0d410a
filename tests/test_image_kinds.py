"""The same image is the same pixels everywhere (issue 19, item 3): every image kind Pillow opens is
converted by ``make-shards folder`` so that the torch loader, DALI's CPU decoder and ``mile-predict``'s
image loading see the picture a viewer shows (EXIF orientation applied, 16-bit scaled, transparency
over white, an animation's first frame), and kinds with no faithful 8-bit form are skipped with the
reason. Also the decompression-bomb guard the converter and ``mile-predict`` share (item 7)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from shards_cli import main_status

from engine.commands.predict import load_image
from pipelines import build_loader, dali_import_error
from pipelines.contract import LoaderConfig
from pipelines.transforms import transform_image, transform_spec
from shards.images import UnreadableImage, open_image
from shards.manifest import load_split

needs_dali = pytest.mark.skipif(dali_import_error() is not None, reason="DALI not importable")
WIDTH, HEIGHT = 40, 30  # not square: a rotation changes the eval crop
IMAGE_PX = 24
# mean |difference| in 8-bit levels after the eval resize and crop: JPEG re-encoding of these smooth
# pictures stays near 1; a rotated, mirrored, blown-out or alpha-dropped picture is tens of levels off
TOLERANCE_LEVELS = 3.0


def picture(seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric H×W×3 uint8 picture (gradients in both directions)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    rng = np.random.default_rng(seed)
    base = rng.uniform(40, 200, size=3)
    pixels = base + 3.0 * x[..., None] * np.array([1, -0.5, 0.2]) + 4.0 * y[..., None] * np.array([-0.3, 1, 0.5])
    return np.clip(pixels - pixels.mean() + 128, 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_16bit_rgb(pixels16: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one)."""
    height, width, _ = pixels16.shape
    rows = b"".join(b"\x00" + pixels16[r].astype(">u2").tobytes() for r in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def png_bomb(side_px: int = 30000) -> bytes:
    """A tiny PNG whose header claims ``side_px``² pixels."""
    header = struct.pack(">IIBBBBB", side_px, side_px, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def with_orientation(upright: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose EXIF orientation tag makes a viewer show ``upright``'s picture."""
    inverse = {2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}[orientation]  # the transpose undoing the tag's
    stored = ImageOps.exif_transpose(_tagged(Image.fromarray(upright), inverse))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif)


def _tagged(image: Image.Image, orientation: int) -> Image.Image:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return Image.open(io.BytesIO(encode(image, "PNG", exif=exif)))


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return np.round(rgb * a + 255 * (1 - a)).astype(np.uint8)


def image_kinds() -> dict[str, tuple[str, bytes, np.ndarray]]:
    """kind -> (file suffix, bytes, the RGB picture a viewer shows)."""
    rgb = picture()
    image = Image.fromarray(rgb)
    gray = np.asarray(image.convert("L"))
    alpha = np.tile(np.linspace(0, 255, WIDTH).astype(np.uint8), (HEIGHT, 1))
    kinds: dict[str, tuple[str, bytes, np.ndarray]] = {}
    plain = encode(image, "JPEG", quality=95)
    kinds["jpeg"] = (".jpg", plain, pil_rgb(plain))
    for orientation in (2, 3, 6, 8):
        kinds[f"jpeg_exif{orientation}"] = (".jpg", with_orientation(rgb, orientation), rgb)
    invalid = Image.Exif()
    invalid[0x0112] = 9  # not an orientation: dropped, the picture kept as stored
    odd = encode(image, "JPEG", quality=95, exif=invalid)
    kinds["jpeg_exif_invalid"] = (".jpg", odd, pil_rgb(odd))
    cmyk = encode(image.convert("CMYK"), "JPEG", quality=95)
    kinds["jpeg_cmyk"] = (".jpg", cmyk, pil_rgb(cmyk))
    kinds["png_rgb"] = (".png", encode(image, "PNG"), rgb)
    kinds["png_gray"] = (".png", encode(image.convert("L"), "PNG"), np.stack([gray] * 3, -1))
    kinds["png_1bit"] = (".png", encode(image.convert("1"), "PNG"), np.asarray(image.convert("1").convert("RGB")))
    rgba = Image.fromarray(np.dstack([rgb, alpha]))
    kinds["png_rgba"] = (".png", encode(rgba, "PNG"), over_white(rgb, alpha))
    la = Image.fromarray(np.dstack([gray, alpha]), mode="LA")
    kinds["png_la"] = (".png", encode(la, "PNG"), over_white(np.stack([gray] * 3, -1), alpha))
    palette = image.quantize(32)
    kinds["png_palette"] = (".png", encode(palette, "PNG"), np.asarray(palette.convert("RGB")))
    corner = int(np.asarray(palette)[0, 0])
    transparent = np.where((np.asarray(palette) == corner)[..., None], 255, np.asarray(palette.convert("RGB")))
    kinds["png_palette_transparency"] = (
        ".png",
        encode(palette, "PNG", transparency=corner),
        transparent.astype(np.uint8),
    )
    sixteen = gray.astype(np.uint16) * 257 + 100  # +100: under half a level, rounds back to gray
    kinds["png_16bit_gray"] = (".png", encode(Image.fromarray(sixteen), "PNG"), np.stack([gray] * 3, -1))
    kinds["png_16bit_rgb"] = (".png", png_16bit_rgb(rgb.astype(np.uint16) * 257), rgb)
    other = Image.fromarray(255 - rgb).quantize(32)
    animated = encode(palette, "GIF", save_all=True, append_images=[other])
    kinds["gif_animated"] = (".gif", animated, np.asarray(palette.convert("RGB")))
    kinds["webp_lossless"] = (".webp", encode(image, "WEBP", lossless=True), rgb)
    kinds["bmp"] = (".bmp", encode(image, "BMP"), rgb)
    kinds["tiff"] = (".tif", encode(image, "TIFF"), rgb)
    return kinds


# kinds with no faithful 8-bit form -> a phrase of the recorded reason
SKIPPED = {
    "tiff_float": (Image.fromarray(picture().mean(-1).astype(np.float32) / 255), "floating-point pixels"),
    "tiff_int32": (Image.fromarray(picture().mean(-1).astype(np.int32) * 1000), "32-bit integer pixels"),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """(shard folder, image folder, kinds): every kind converted through ``make-shards folder``,
    one class per kind so a loader's label tells which kind an image is."""
    root = tmp_path_factory.mktemp("kinds")
    images, kinds = root / "images", image_kinds()
    images.mkdir()
    rows = []
    for name, (suffix, data, _) in kinds.items():
        (images / f"{name}{suffix}").write_bytes(data)
        rows.append(f"{name}{suffix},{name}")
    for name, (image, _) in SKIPPED.items():
        (images / f"{name}.tif").write_bytes(encode(image, "TIFF"))
        rows.append(f"{name}.tif,{name}")
    (images / "bomb.png").write_bytes(png_bomb())
    rows.append("bomb.png,bomb")
    (root / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    args = ["--images", str(images), "--labels", str(root / "labels.csv"), "--split", "val", "--out", str(root / "out")]
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert main_status(monkeypatch, "folder", *args, "--workers", "1") == 0
    return root / "out", images, kinds


def loader_config(backend: str) -> LoaderConfig:
    return LoaderConfig(
        batch_size=8,
        image_size_px=IMAGE_PX,
        train=False,
        eval_crop_fraction=1.0,
        mean=(0.0,) * 3,
        std=(1.0,) * 3,
        backend=backend,
        num_workers=0 if backend == "torch" else 1,
    )


def loaded(out: Path, backend: str) -> dict[str, torch.Tensor]:
    """kind -> the eval image (C×S×S, 0..255 floats) the loader gives."""
    names = load_split(out, "val").class_names
    loader = build_loader(out, "val", loader_config(backend))
    try:
        batches = list(loader.epoch(0, 0))
    finally:
        loader.close()
    images = torch.cat([b.images for b in batches]).float() * 255
    labels = torch.cat([b.labels for b in batches]).tolist()
    return {names[label]: image for label, image in zip(labels, images)}


def expected(pixels: np.ndarray) -> torch.Tensor:
    spec = transform_spec(loader_config("torch"))
    return transform_image(torch.from_numpy(pixels.copy()).permute(2, 0, 1), spec, None).float()


def levels(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


def test_kinds_without_a_faithful_form_are_skipped_with_the_reason(converted):
    out, _, kinds = converted
    split = load_split(out, "val")
    reasons = {r.source: r.reason for r in split.skipped}
    assert sorted(reasons) == sorted([f"{n}.tif" for n in SKIPPED] + ["bomb.png"])
    for name, (_, phrase) in SKIPPED.items():
        assert phrase in reasons[f"{name}.tif"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert split.num_samples == len(kinds)


def test_torch_loader_shows_the_picture_a_viewer_shows(converted):
    out, _, kinds = converted
    images = loaded(out, "torch")
    off = {name: levels(images[name], expected(kinds[name][2])) for name in kinds}
    assert max(off.values()) < TOLERANCE_LEVELS, off


def test_predict_loads_exactly_the_pixels_the_loader_gives_the_converted_file(converted):
    out, folder, kinds = converted
    images = loaded(out, "torch")
    spec = transform_spec(loader_config("torch"))
    off = {}
    for name, (suffix, _, _) in kinds.items():
        predicted = load_image(folder / f"{name}{suffix}", spec).permute(2, 0, 1).float()
        off[name] = float((predicted - images[name]).abs().max())
    assert max(off.values()) < 0.01, off  # float rounding of the loader's normalisation only


@pytest.mark.dali
@needs_dali
def test_dali_cpu_decoder_agrees_with_the_torch_loader(converted):
    out, _, kinds = converted
    torch_images, dali_images = loaded(out, "torch"), loaded(out, "dali")
    off = {name: levels(dali_images[name], torch_images[name]) for name in kinds}
    assert max(off.values()) < TOLERANCE_LEVELS, off


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_predict_refuses_what_the_converter_skips_in_one_line(tmp_path, name):
    image, phrase = SKIPPED[name]
    path = tmp_path / f"{name}.tif"
    path.write_bytes(encode(image, "TIFF"))
    with pytest.raises(UnreadableImage, match=phrase):  # mile-predict skips it, naming the file and this reason
        load_image(path, transform_spec(loader_config("torch")))


def test_the_decompression_bomb_guard_is_shared_by_converter_and_predict(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb())
    with pytest.raises(UnreadableImage, match="decompression bomb"):
        open_image(path.read_bytes())
    with pytest.raises(UnreadableImage, match=r"too many pixels"):
        load_image(path, transform_spec(loader_config("torch")))


def test_vector_formats_are_refused_unread(tmp_path):
    # A minimal EPS: Pillow would hand it to Ghostscript (an external program) when installed.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
    path = tmp_path / "drawing.jpg"
    path.write_bytes(eps)
    with pytest.raises(UnreadableImage, match="cannot identify image file"):  # not "Ghostscript ..."
        open_image(eps)
    with pytest.raises(UnreadableImage, match="cannot identify image file"):
        load_image(path, transform_spec(loader_config("torch")))
