"""Loader benchmark: train-mode decode+augment images/s of each backend and of a plain PIL DataLoader, side by side.

Data: ``num_images`` photo-like JPEGs (~500×375, landscape and portrait) made from the two real
photos scikit-learn bundles, by random crops, resizing and colour jitter. The same JPEG bytes go
into WebDataset shards (for the DALI and torch backends) and into an ``ImageFolder`` tree (for the
baseline: PIL open, RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize in a torch
``DataLoader``, the way the released MILe code loads data). Every loader runs with the same batch
size, worker count and image size; one warm-up epoch first, then ``repeats`` timed epochs, of
which the median and the spread (min, max) are reported, with the CPU time the loader's process
tree spent per image. Timed epochs of the loaders are interleaved round by round, so background
load on a shared machine hits them alike.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageEnhance

from pipelines import build_loader, dali_import_error
from pipelines.contract import IMAGENET_MEAN, IMAGENET_STD, Loader, LoaderConfig
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
    cpu_ms_per_image: list[float] = field(default_factory=list)  # CPU time of the process tree per image
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.images_per_s) if self.images_per_s else None

    @property
    def median_cpu_ms(self) -> float | None:
        return statistics.median(self.cpu_ms_per_image) if self.cpu_ms_per_image else None


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


def write_bench_data(root: Path, jpegs: list[bytes], num_classes: int = 1) -> None:
    """``root/folder/CLASS/*.jpg`` (ImageFolder layout) and shards of split ``bench`` in ``root/shards``,
    the same bytes in both; image i has label i mod ``num_classes``."""
    class_names = ["photo"] if num_classes == 1 else [f"c{c:04d}" for c in range(num_classes)]  # sorted = label order
    items = []
    for i, data in enumerate(jpegs):
        label = i % num_classes
        folder = root / "folder" / class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:05d}.jpg"
        path.write_bytes(data)
        items.append(SourceItem(key=f"img{i:05d}", label=label, source=path.name, path=str(path)))
    spec = SplitSpec(SPLIT, LabelKind.SINGLE, class_names)
    write_split(root / "shards", spec, items, WriterSettings(progress=False))  # valid JPEGs pass through byte-for-byte


class TimedLoader(Protocol):
    """What ``time_epoch`` times: the project's loaders, ``PilFolderLoader`` and ``dali_gap``'s variants."""

    def epoch(self, epoch: int) -> Iterable[Any]: ...

    def close(self) -> None: ...


class PilFolderLoader:
    """The baseline: ImageFolder + PIL transforms in a DataLoader, behind the ``epoch``/``close`` interface."""

    def __init__(self, root: Path, config: LoaderBenchConfig, pin_memory: bool = False) -> None:
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
        self.loader: torch.utils.data.DataLoader | None = torch.utils.data.DataLoader(
            dataset,
            batch_size=config.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=config.workers,
            persistent_workers=config.workers > 0,
            pin_memory=pin_memory,
        )

    def epoch(self, epoch: int) -> Iterable[Any]:
        if self.loader is None:
            raise RuntimeError("PilFolderLoader.epoch after close()")
        return self.loader

    def close(self) -> None:
        self.loader = None


def backend_loader(root: Path, config: LoaderBenchConfig, backend: str, device: str) -> Loader:
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
    return build_loader(root / "shards", SPLIT, loader_config)


def time_epoch(loader: TimedLoader, epoch: int, device: str) -> tuple[float, float]:
    """(images/s, CPU ms per image) of one whole epoch, first batch request to last batch ready.

    CPU time counts this process's threads (DALI's among them) and its worker processes; unlike
    wall time it barely moves when other jobs share the machine."""
    start, cpu_start = time.perf_counter(), cpu_seconds_tree()
    count = sum(_batch_size(batch) for batch in loader.epoch(epoch))
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # sync point: the last batch's device work belongs to this epoch
    return count / (time.perf_counter() - start), 1000.0 * (cpu_seconds_tree() - cpu_start) / count


def cpu_seconds_tree() -> float:
    """CPU seconds used so far by this process, its reaped children and its live descendants (Linux)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = time.process_time() + children.ru_utime + children.ru_stime
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    for pid in _descendants(os.getpid()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile: its time moves to RUSAGE_CHILDREN once reaped
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks_per_s  # utime, stime (fields 14, 15)
    return total


def _descendants(pid: int) -> list[int]:
    found = []
    for children_file in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            for child in map(int, children_file.read_text().split()):
                found += [child, *_descendants(child)]
        except OSError:
            continue
    return found


def _batch_size(batch: Any) -> int:
    images = batch.images if hasattr(batch, "images") else batch[0]
    return int(images.shape[0])


def candidates(root: Path, config: LoaderBenchConfig) -> Iterator[tuple[str, str, Callable[[], Any]]]:
    """(name, device, loader factory) of every loader this machine can run."""
    has_dali = dali_import_error() is None
    if has_dali:
        yield "DALI CPU backend", "cpu", lambda: backend_loader(root, config, "dali", "cpu")
    yield "torch backend", "cpu", lambda: backend_loader(root, config, "torch", "cpu")
    yield "PIL + torchvision.transforms DataLoader", "cpu", lambda: PilFolderLoader(root, config)
    if torch.cuda.is_available():
        yield "torch backend, GPU decode", "cuda", lambda: backend_loader(root, config, "torch", "cuda")
        if has_dali:
            yield "DALI GPU backend", "cuda", lambda: backend_loader(root, config, "dali", "cuda")


def run_loader_bench(config: LoaderBenchConfig) -> list[LoaderResult]:
    """Build the data in a temporary folder, warm every available loader up, then time them in
    interleaved rounds (one epoch each per round), so load from other processes on the machine
    affects all loaders alike instead of whichever happened to run at the time."""
    with tempfile.TemporaryDirectory(prefix="bench-loaders-") as tmp:
        root = Path(tmp)
        write_bench_data(root, photo_jpegs(config.num_images, config.seed))
        running = []
        for name, device, factory in candidates(root, config):
            result = LoaderResult(name, device)
            running.append((result, _attempt(result, factory)))
        for epoch in range(config.warmup_epochs + config.repeats):
            for result, loader in running:
                if loader is None or result.error is not None:
                    continue
                timing = _attempt(result, functools.partial(time_epoch, loader, epoch, result.device))
                if timing is not None and epoch >= config.warmup_epochs:
                    result.images_per_s.append(timing[0])
                    result.cpu_ms_per_image.append(timing[1])
        for _, loader in running:
            if loader is not None:
                loader.close()
        return [result for result, _ in running]


def _attempt(result: LoaderResult, action: Callable[[], Any]) -> Any:
    """``action()``, or None with the error recorded: one broken loader must not hide the others' numbers."""
    try:
        return action()
    except Exception as error:
        result.error = f"{type(error).__name__}: {error}"
        return None


def format_table(results: list[LoaderResult]) -> str:
    lines = [f"{'loader':<40} {'device':<6} {'median img/s':>12} {'min':>7} {'max':>7} {'CPU ms/img':>10}"]
    for r in results:
        if r.error:
            lines.append(f"{r.name:<40} {r.device:<6} failed: {r.error}")
        else:
            rates = r.images_per_s
            lines.append(
                f"{r.name:<40} {r.device:<6} {r.median:>12.1f} {min(rates):>7.1f} {max(rates):>7.1f} "
                f"{r.median_cpu_ms:>10.2f}"
            )
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
        "load_average_1min": os.getloadavg()[0],  # other processes on the machine skew every figure
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if dali_import_error() is None:
        import nvidia.dali

        env["dali"] = nvidia.dali.__version__
    return env


def write_json(path: Path, config: LoaderBenchConfig, results: list[LoaderResult], env: dict[str, Any]) -> None:
    """``env``: ``environment()`` taken before the run (its load average is the one that matters)."""
    report = {
        "benchmark": "loaders",
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
        "environment": {**env, "load_average_1min_after": os.getloadavg()[0]},
        "results": [
            {**asdict(r), "median_images_per_s": r.median, "median_cpu_ms_per_image": r.median_cpu_ms} for r in results
        ],
    }
    path.write_text(json.dumps(report, indent=1) + "\n")
