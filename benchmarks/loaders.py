"""Loader benchmark: train-mode decode+augment images/s of each backend, of the plain pipeline of
each backend's library, and of a plain PIL DataLoader, side by side in one run.

Data: ``num_images`` photo-like JPEGs (~500×375, landscape and portrait) made from the two real
photos scikit-learn bundles, by random crops, resizing and colour jitter. The same JPEG bytes go
into WebDataset shards (for the DALI and torch backends and the plain DALI pipeline) and into an
``ImageFolder`` tree (for the plain torchvision DataLoader and the PIL one). Rows:

- the project's backends (``build_loader``): DALI on the CPU, torch on the CPU (and, with CUDA,
  their GPU-decode forms);
- the reference of each library, what a user of that library alone would write: the plain DALI
  CPU pipeline of ``benchmarks.dali_gap`` (reference of the DALI backend) and a plain
  ``torchvision.io.decode_jpeg`` + ``torchvision.transforms.v2`` ``ImageFolder`` DataLoader,
  normalising in its workers (reference of the torch backend);
- the released MILe code's way: PIL open, RandomResizedCrop, RandomHorizontalFlip, ToTensor,
  Normalize in a DataLoader.

Every loader runs with the same batch size, worker count (DataLoader processes or DALI threads)
and image size; one warm-up epoch first, then ``repeats`` rounds in which every loader times one
epoch, so background load on a shared machine hits them alike. Per row: the median and spread
(min, max) of images/s, the CPU time the loader's process tree spent per image, and for each
project row its ratio to its library's reference, taken within each round (median and min-max
over rounds).
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
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from PIL import Image, ImageEnhance

from pipelines import build_loader, dali_import_error
from pipelines.contract import IMAGENET_MEAN, IMAGENET_STD, Loader, LoaderConfig
from shards.format import LabelKind
from shards.images import encode_jpeg
from shards.writer import SourceItem, SplitSpec, WriterSettings, write_split

Factory = TypeVar("Factory")  # what builds one row's loader
SPLIT = "bench"
PHOTO_SIDES_PX = (500, 375)
PLAIN_DALI = "plain DALI CPU pipeline"  # benchmarks.dali_gap.PLAIN, its row name there too
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


DALI_BACKEND = "DALI CPU backend"
TORCH_BACKEND = "torch backend"
PLAIN_TORCHVISION = "plain torchvision.io + v2 DataLoader"
PIL_LOADER = "PIL + torchvision.transforms DataLoader"


@dataclass
class LoaderResult:
    name: str
    device: str
    reference: str | None = None  # the row this one is compared with (its library's plain pipeline)
    images_per_s: list[float] = field(default_factory=list)  # one per timed epoch
    cpu_ms_per_image: list[float] = field(default_factory=list)  # CPU time of the process tree per image
    # per round: images/s over the reference's, and the reference's CPU ms per image over this row's
    ratio_to_reference: list[float] = field(default_factory=list)
    cpu_ratio_to_reference: list[float] = field(default_factory=list)
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
        self.loader: torch.utils.data.DataLoader | None = folder_dataloader(dataset, config, pin_memory)

    def epoch(self, epoch: int) -> Iterable[Any]:
        if self.loader is None:
            raise RuntimeError(f"{type(self).__name__}.epoch after close()")
        return self.loader

    def close(self) -> None:
        self.loader = None


def folder_dataloader(
    dataset: torch.utils.data.Dataset, config: LoaderBenchConfig, pin_memory: bool
) -> torch.utils.data.DataLoader:
    """The reference rows' DataLoader: shuffled, last partial batch dropped, persistent workers."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=config.workers,
        persistent_workers=config.workers > 0,
        pin_memory=pin_memory,
    )


def read_jpeg(path: str) -> torch.Tensor:
    """``ImageFolder``'s loader for the plain torchvision row: file bytes -> uint8 3×H×W RGB."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    return decode_jpeg(read_file(path), mode=ImageReadMode.RGB)


class TorchvisionFolderLoader(PilFolderLoader):
    """The torch backend's reference: what a torchvision user writes with its fast tensor path.
    ``ImageFolder`` reading the JPEG files, ``decode_jpeg``, v2 ``RandomResizedCrop`` (antialiased),
    ``RandomHorizontalFlip``, ``ToDtype(float32, scale=True)`` and ``Normalize`` in the workers,
    default collation (float32 N×C×H×W)."""

    def __init__(self, root: Path, config: LoaderBenchConfig) -> None:
        from torchvision import datasets
        from torchvision.transforms import v2

        transform = v2.Compose(
            [
                v2.RandomResizedCrop(config.image_size_px, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        dataset = datasets.ImageFolder(str(root / "folder"), transform=transform, loader=read_jpeg)
        self.loader = folder_dataloader(dataset, config, pin_memory=False)


def plain_dali_loader(root: Path, config: LoaderBenchConfig) -> TimedLoader:
    """The DALI backend's reference: ``benchmarks.dali_gap``'s plain DALI CPU pipeline."""
    from benchmarks.dali_gap import PLAIN, VariantLoader, variants

    (plain,) = [v for v in variants() if v.name == PLAIN]
    return VariantLoader(root / "shards", plain, config)


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


SETTLE_POLL_S = 0.02  # how often ``settle`` looks at the process tree's CPU time
SETTLE_IDLE_CPU_S = 0.002  # CPU time per poll below which the tree counts as idle (polling itself costs some)
SETTLE_MAX_S = 10.0  # a tree that never idles (a thread polling busily) is measured up to here


def time_epoch(loader: TimedLoader, epoch: int, device: str) -> tuple[float, float]:
    """(images/s, CPU ms per image) of one whole epoch, first batch request to last batch ready,
    and on until the work the loader queued meanwhile is done (``settle``).

    CPU time counts this process's threads (DALI's among them) and its worker processes; unlike
    wall time it barely moves when other jobs share the machine."""
    start, cpu_start = time.perf_counter(), cpu_seconds_tree()
    count = sum(_batch_size(batch) for batch in loader.epoch(epoch))
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # sync point: the last batch's device work belongs to this epoch
    end, cpu_end = settle()
    return count / (end - start), 1000.0 * (cpu_end - cpu_start) / count


def settle() -> tuple[float, float]:
    """(wall clock, process-tree CPU seconds) once the tree is idle: the time of the last poll that
    still found work. A loader that keeps working after its last batch (a long-lived DALI pipeline
    runs its next epoch's first batches ahead) is charged for that work here, not the row timed
    after it (which it would also slow down)."""
    end, cpu_end = time.perf_counter(), cpu_seconds_tree()
    deadline = end + SETTLE_MAX_S
    while end < deadline:
        time.sleep(SETTLE_POLL_S)
        now, cpu_now = time.perf_counter(), cpu_seconds_tree()
        if cpu_now - cpu_end < SETTLE_IDLE_CPU_S:
            break
        end, cpu_end = now, cpu_now
    return end, cpu_end


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


def candidates(root: Path, config: LoaderBenchConfig) -> Iterator[tuple[LoaderResult, Callable[[], Any]]]:
    """(empty result naming the row, loader factory) of every loader this machine can run."""
    has_dali = dali_import_error() is None
    if has_dali:
        yield (
            LoaderResult(DALI_BACKEND, "cpu", reference=PLAIN_DALI),
            lambda: backend_loader(root, config, "dali", "cpu"),
        )
        yield LoaderResult(PLAIN_DALI, "cpu"), lambda: plain_dali_loader(root, config)
    torch_backend = functools.partial(backend_loader, root, config, "torch", "cpu")
    yield LoaderResult(TORCH_BACKEND, "cpu", reference=PLAIN_TORCHVISION), torch_backend
    yield LoaderResult(PLAIN_TORCHVISION, "cpu"), lambda: TorchvisionFolderLoader(root, config)
    yield LoaderResult(PIL_LOADER, "cpu"), lambda: PilFolderLoader(root, config)
    if torch.cuda.is_available():
        yield LoaderResult("torch backend, GPU decode", "cuda"), lambda: backend_loader(root, config, "torch", "cuda")
        if has_dali:
            yield LoaderResult("DALI GPU backend", "cuda"), lambda: backend_loader(root, config, "dali", "cuda")


def run_loader_bench(config: LoaderBenchConfig) -> list[LoaderResult]:
    """Build the data in a temporary folder, warm every available loader up, then time them in
    interleaved rounds (one epoch each per round), so load from other processes on the machine
    affects all loaders alike instead of whichever happened to run at the time."""
    with tempfile.TemporaryDirectory(prefix="bench-loaders-") as tmp:
        root = Path(tmp)
        write_bench_data(root, photo_jpegs(config.num_images, config.seed))
        running = [(result, _attempt(result, factory)) for result, factory in candidates(root, config)]
        for epoch in range(config.warmup_epochs + config.repeats):
            timings = {}
            for result, loader in running:
                if loader is None or result.error is not None:
                    continue
                timing = _attempt(result, functools.partial(time_epoch, loader, epoch, result.device))
                if timing is not None:
                    timings[result.name] = timing
            if epoch >= config.warmup_epochs:
                record_round([result for result, _ in running], timings)
        for _, loader in running:
            if loader is not None:
                loader.close()
        return [result for result, _ in running]


def record_round(results: list[LoaderResult], timings: dict[str, tuple[float, float]]) -> None:
    """Append one round's (images/s, CPU ms per image) to each row, and each row's ratios to its
    reference measured in the same round (none when either failed)."""
    for result in results:
        if result.name not in timings:
            continue
        rate, cpu_ms = timings[result.name]
        result.images_per_s.append(rate)
        result.cpu_ms_per_image.append(cpu_ms)
        if result.reference in timings:
            reference_rate, reference_cpu_ms = timings[result.reference]
            result.ratio_to_reference.append(rate / reference_rate)
            result.cpu_ratio_to_reference.append(reference_cpu_ms / cpu_ms)


def _attempt(result: LoaderResult, action: Callable[[], Any]) -> Any:
    """``action()``, or None with the error recorded: one broken loader must not hide the others' numbers."""
    try:
        return action()
    except Exception as error:
        result.error = f"{type(error).__name__}: {error}"
        return None


def format_table(results: list[LoaderResult]) -> str:
    lines = [
        f"{'loader':<40} {'device':<6} {'median img/s':>12} {'min':>7} {'max':>7} {'CPU ms/img':>10} "
        f"{'x reference (min-max)':>22} {'CPU x ref':>9}"
    ]
    for r in results:
        if r.error:
            lines.append(f"{r.name:<40} {r.device:<6} failed: {r.error}")
        elif r.images_per_s:
            rates = r.images_per_s
            lines.append(
                f"{r.name:<40} {r.device:<6} {r.median:>12.1f} {min(rates):>7.1f} {max(rates):>7.1f} "
                f"{r.median_cpu_ms:>10.2f} {_ratio_cell(r.ratio_to_reference):>22} "
                f"{_ratio_cell(r.cpu_ratio_to_reference, spread=False):>9}"
            )
    references = sorted({f"{r.name} -> {r.reference}" for r in results if r.reference})
    lines.append(
        "x reference: images/s over the reference's in the same round; CPU x ref: its CPU ms/img over this row's"
    )
    lines += [f"  {pair}" for pair in references]
    return "\n".join(lines)


def _ratio_cell(ratios: list[float], spread: bool = True) -> str:
    """``median (min-max)`` of per-round ratios, or ``-`` for a row without a reference."""
    if not ratios:
        return "-"
    median = f"{statistics.median(ratios):.3f}"
    return f"{median} ({min(ratios):.2f}-{max(ratios):.2f})" if spread else median


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


def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def write_json(path: Path, config: LoaderBenchConfig, results: list[LoaderResult], env: dict[str, Any]) -> None:
    """``env``: ``environment()`` taken before the run (its load average is the one that matters)."""
    write_report(path, "loaders", config, "results", results, env)


def select_rows(factories: list[tuple[str, Factory]], parts: tuple[str, ...], always: str) -> list[tuple[str, Factory]]:
    """The rows whose names contain one of ``parts`` (all when none), and the ``always`` row; a part
    that names no row is a ValueError listing the rows (a typo must not silently measure nothing)."""
    unmatched = [part for part in parts if not any(part in name for name, _ in factories)]
    if unmatched:
        names = "; ".join(name for name, _ in factories)
        raise ValueError(f"--rows {', '.join(map(repr, unmatched))} names no row; the rows: {names}")
    return [(name, f) for name, f in factories if name == always or not parts or any(p in name for p in parts)]


def write_report(
    path: Path, benchmark: str, config: LoaderBenchConfig, rows_key: str, rows: list[Any], env: dict[str, Any]
) -> None:
    """The JSON of a loader benchmark (``loaders``, ``dali-gap``, ``torch-gap``): config, environment
    with the load average before and after, and each row (a dataclass) with the median of every
    per-round list it holds (``median_images_per_s``, ``median_ratio_to_plain``, ...)."""
    report = {
        "benchmark": benchmark,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
        "environment": {**env, "load_average_1min_after": os.getloadavg()[0]},
        rows_key: [with_medians(row) for row in rows],
    }
    path.write_text(json.dumps(report, indent=1) + "\n")


def with_medians(row: Any) -> dict[str, Any]:
    """A row dataclass as a dict, with ``median_NAME`` beside every list field ``NAME`` (None when empty)."""
    fields = asdict(row)
    return {**fields, **{f"median_{name}": _median_or_none(v) for name, v in fields.items() if isinstance(v, list)}}
