"""Loader benchmark: train-mode decode+augment images/s of each backend and of a plain PIL DataLoader, side by side.

Data: ``num_images`` photo-like JPEGs (~500×375, landscape and portrait) made from the two real
photos scikit-learn bundles, by random crops, resizing and colour jitter. The same JPEG bytes go
into WebDataset shards (for the DALI and torch backends) and into an ``ImageFolder`` tree (for the
baseline: PIL open, RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize in a torch
``DataLoader``, the way the released MILe code loads data). Every loader runs with the same batch
size, worker count and image size; one warm-up epoch first, then ``repeats`` timed epochs, of
which the median and the spread (min, max) are reported.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image, ImageEnhance

from pipelines import build_loader, dali_import_error
from pipelines.contract import IMAGENET_MEAN, IMAGENET_STD, LoaderConfig
from shards.format import LabelKind
from shards.images import encode_jpeg
from shards.writer import SourceItem, SplitSpec, WriterSettings, write_split

SPLIT = "bench"
PHOTO_SIDES_PX = (500, 375)
JPEG_QUALITY = 90  # ImageNet's own files are mostly quality 75-96


@dataclass(frozen=True)
class LoaderBenchConfig:
    num_images: int = 512
    batch_size: int = 64
    image_size_px: int = 224
    workers: int = 2
    repeats: int = 5
    warmup_epochs: int = 1
    seed: int = 0


@dataclass
class LoaderResult:
    name: str
    device: str
    images_per_s: list[float] = field(default_factory=list)  # one per timed epoch
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.images_per_s) if self.images_per_s else None


def photo_jpegs(count: int, seed: int) -> list[bytes]:
    """``count`` photo-like JPEGs: random crops of the bundled photos, resized to 500×375 or
    375×500, with brightness/contrast/saturation jitter."""
    from sklearn.datasets import load_sample_images  # bundled with scikit-learn: no download

    photos = [Image.fromarray(image) for image in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        crop_w, crop_h = (int(side * rng.uniform(0.6, 1.0)) for side in photo.size)
        left, top = int(rng.integers(photo.width - crop_w + 1)), int(rng.integers(photo.height - crop_h + 1))
        size = PHOTO_SIDES_PX if rng.random() < 0.75 else PHOTO_SIDES_PX[::-1]
        image = photo.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhance(image).enhance(rng.uniform(0.6, 1.4))
        out.append(encode_jpeg(image, JPEG_QUALITY))
    return out


def write_bench_data(root: Path, jpegs: list[bytes]) -> None:
    """``root/folder/photo/*.jpg`` (ImageFolder layout, one class) and shards of split ``bench`` in ``root/shards``."""
    folder = root / "folder" / "photo"
    folder.mkdir(parents=True)
    items = []
    for i, data in enumerate(jpegs):
        path = folder / f"img{i:05d}.jpg"
        path.write_bytes(data)
        items.append(SourceItem(key=f"img{i:05d}", label=0, source=path.name, path=str(path)))
    spec = SplitSpec(SPLIT, LabelKind.SINGLE, ["photo"])
    write_split(root / "shards", spec, items, WriterSettings(progress=False))  # valid JPEGs pass through byte-for-byte


def pil_dataloader(root: Path, config: LoaderBenchConfig) -> Callable[[int], Iterable[Any]]:
    """The baseline: ImageFolder + PIL transforms in a DataLoader (per-epoch iterables)."""
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(config.image_size_px),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = datasets.ImageFolder(str(root / "folder"), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=config.workers,
        persistent_workers=config.workers > 0,
    )
    return lambda epoch: loader


def backend_epochs(root: Path, config: LoaderBenchConfig, backend: str, device: str) -> Callable[[int], Iterable[Any]]:
    loader_config = LoaderConfig(
        batch_size=config.batch_size,
        image_size_px=config.image_size_px,
        train=True,
        backend=backend,
        num_workers=config.workers,
        seed=config.seed,
        device=device,
        shuffle_buffer=config.num_images,
    )
    loader = build_loader(root / "shards", SPLIT, loader_config)
    return loader.epoch


def time_epochs(epochs: Callable[[int], Iterable[Any]], config: LoaderBenchConfig, device: str) -> list[float]:
    """images/s of each timed epoch, after the warm-up epochs (worker start-up, allocator, caches)."""
    rates = []
    for epoch in range(config.warmup_epochs + config.repeats):
        start = time.perf_counter()
        count = sum(_batch_size(batch) for batch in epochs(epoch))
        if device.startswith("cuda"):
            torch.cuda.synchronize()  # sync point: the last batch's device work belongs to this epoch
        elapsed = time.perf_counter() - start
        if epoch >= config.warmup_epochs:
            rates.append(count / elapsed)
    return rates


def _batch_size(batch: Any) -> int:
    images = batch.images if hasattr(batch, "images") else batch[0]
    return int(images.shape[0])


def candidates(root: Path, config: LoaderBenchConfig) -> Iterator[tuple[str, str, Callable[[], Callable[[int], Iterable[Any]]]]]:
    """(name, device, factory) of every loader this machine can run."""
    has_dali = dali_import_error() is None
    if has_dali:
        yield "DALI CPU backend", "cpu", lambda: backend_epochs(root, config, "dali", "cpu")
    yield "torch backend", "cpu", lambda: backend_epochs(root, config, "torch", "cpu")
    yield "PIL + torchvision.transforms DataLoader", "cpu", lambda: pil_dataloader(root, config)
    if torch.cuda.is_available():
        yield "torch backend, GPU decode", "cuda", lambda: backend_epochs(root, config, "torch", "cuda")
        if has_dali:
            yield "DALI GPU backend", "cuda", lambda: backend_epochs(root, config, "dali", "cuda")


def run_loader_bench(config: LoaderBenchConfig) -> list[LoaderResult]:
    """Build the data in a temporary folder and time every available loader on it."""
    with tempfile.TemporaryDirectory(prefix="bench-loaders-") as tmp:
        root = Path(tmp)
        write_bench_data(root, photo_jpegs(config.num_images, config.seed))
        results = []
        for name, device, factory in candidates(root, config):
            result = LoaderResult(name, device)
            try:
                result.images_per_s = time_epochs(factory(), config, device)
            except Exception as error:  # one broken loader must not hide the others' numbers
                result.error = f"{type(error).__name__}: {error}"
            results.append(result)
        return results


def format_table(results: list[LoaderResult]) -> str:
    lines = [f"{'loader':<42} {'device':<6} {'median img/s':>12} {'min':>8} {'max':>8}"]
    for r in results:
        if r.error:
            lines.append(f"{r.name:<42} {r.device:<6} failed: {r.error}")
        else:
            lines.append(f"{r.name:<42} {r.device:<6} {r.median:>12.1f} {min(r.images_per_s):>8.1f} {max(r.images_per_s):>8.1f}")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Versions and hardware facts (no host names or paths)."""
    import PIL
    import torchvision

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "machine": platform.machine(),
        "cpu_count": len(os.sched_getaffinity(0)),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if dali_import_error() is None:
        import nvidia.dali

        env["dali"] = nvidia.dali.__version__
    return env


def write_json(path: Path, config: LoaderBenchConfig, results: list[LoaderResult]) -> None:
    report = {
        "benchmark": "loaders",
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
        "environment": environment(),
        "results": [{**asdict(r), "median_images_per_s": r.median} for r in results],
    }
    path.write_text(json.dumps(report, indent=1) + "\n")
