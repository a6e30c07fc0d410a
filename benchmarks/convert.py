"""Conversion benchmark: images/s of ``make_shards imagenet`` (pass-through and resizing) and the cost of ``verify``.

Data: an ImageNet-style ``train/`` tree of photo-like JPEGs (the loader benchmark's ~500×375 crops
of scikit-learn's two bundled photos); ``large_fraction`` of them are enlarged to 800×600 so that
``--max-side 500`` really resizes and re-encodes them, as it would ImageNet's larger photos. Each
configuration runs ``repeats`` times into a fresh folder (files in the page cache after the first
run); the median and the spread are reported.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shards.images import ImagePolicy, encode_jpeg
from shards.sources.common import imagenet_wnids, write_planned
from shards.sources.imagenet import ImageNetOptions, imagenet_plan
from shards.verify import verify_root
from shards.writer import WriterSettings

LARGE_SIDES_PX = (800, 600)
NUM_CLASSES = 10
JPEG_QUALITY = 90
SHARD_SAMPLES = 250  # several shards even for 1,000 images: verify spreads work across shards


@dataclass(frozen=True)
class ConvertBenchConfig:
    num_images: int = 1000
    large_fraction: float = 0.3
    max_side_px: int = 500
    workers: tuple[int, ...] = (1, 2)
    repeats: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.large_fraction <= 1.0:
            raise ValueError(f"large_fraction must be in [0, 1], got {self.large_fraction}")
        if self.num_images < 1 or self.repeats < 1 or not self.workers:
            raise ValueError("num_images and repeats must be >= 1, and workers non-empty")


@dataclass
class BenchResult:
    """One measured configuration: seconds per repeat over ``num_images`` images."""

    task: str
    workers: int
    max_side_px: int | None
    num_images: int
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # this process + its workers: robust to other load
    other_cpu_seconds: list[float] = field(default_factory=list)  # used by other processes meanwhile

    def measure(self, run: Callable[[], float]) -> None:
        """Run once; record wall seconds (as ``run`` returns them), own and other processes' CPU seconds."""
        busy_start, cpu_start = machine_busy_seconds(), cpu_seconds()
        self.seconds.append(run())
        own = cpu_seconds() - cpu_start
        self.cpu_seconds.append(own)
        self.other_cpu_seconds.append(max(0.0, machine_busy_seconds() - busy_start - own))

    @property
    def cpu_ms_per_image(self) -> float:
        return statistics.median(self.cpu_seconds) * 1000 / self.num_images

    @property
    def images_per_s(self) -> float:
        return self.num_images / statistics.median(self.seconds)

    @property
    def s_per_1000(self) -> float:
        return statistics.median(self.seconds) * 1000 / self.num_images


def write_photo_tree(root: Path, config: ConvertBenchConfig) -> int:
    """ImageNet-style ``root/train/nXXXXXXXX/*.JPEG``; returns how many photos are 800×600."""
    from benchmarks.loaders import photo_jpegs  # the same photo-like JPEGs as the loader benchmark

    rng = np.random.default_rng(config.seed)
    wnids = imagenet_wnids()[:NUM_CLASSES]
    num_large = 0
    for i, data in enumerate(photo_jpegs(config.num_images, config.seed)):
        if rng.random() < config.large_fraction:
            data, num_large = _enlarge(data), num_large + 1
        folder = root / "train" / wnids[i % NUM_CLASSES]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{wnids[i % NUM_CLASSES]}_{i}.JPEG").write_bytes(data)
    return num_large


def _enlarge(data: bytes) -> bytes:
    image = Image.open(io.BytesIO(data))
    size = LARGE_SIDES_PX if image.width >= image.height else LARGE_SIDES_PX[::-1]
    return encode_jpeg(image.convert("RGB").resize(size, Image.Resampling.BICUBIC), JPEG_QUALITY)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def machine_busy_seconds() -> float:
    """Non-idle CPU seconds of the whole machine since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def time_conversion(data_root: Path, out: Path, workers: int, max_side_px: int | None) -> float:
    """Wall seconds of a whole conversion (listing, decoding, encoding, tar writing, hashing)."""
    started = time.perf_counter()
    plan = imagenet_plan(ImageNetOptions(root=data_root, splits=("train",)))
    settings = WriterSettings(
        max_samples_per_shard=SHARD_SAMPLES, workers=workers, progress=False, image=ImagePolicy(max_side_px=max_side_px)
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the writer's per-split summary would break the table
        write_planned(out, plan, settings)
    return time.perf_counter() - started


def run_convert_bench(config: ConvertBenchConfig) -> tuple[list[BenchResult], int]:
    """Every conversion configuration, then ``verify`` of the pass-through shards; and the 800×600 count."""
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        data_root = Path(tmp) / "data"
        num_large = write_photo_tree(data_root, config)
        for max_side_px in (None, config.max_side_px):
            for workers in config.workers:
                result = BenchResult("convert", workers, max_side_px, config.num_images)
                for repeat in range(config.repeats):
                    out = Path(tmp) / f"out_{max_side_px}_{workers}_{repeat}"
                    result.measure(functools.partial(time_conversion, data_root, out, workers, max_side_px))
                results.append(result)
        results += _verify_results(Path(tmp) / f"out_None_{config.workers[0]}_0", config)
    return results, num_large


def _verify_results(shards: Path, config: ConvertBenchConfig) -> list[BenchResult]:
    results = []
    for workers in config.workers:
        result = BenchResult("verify", workers, None, config.num_images)
        for _ in range(config.repeats):
            result.measure(functools.partial(_timed_verify, shards, workers))
        results.append(result)
    return results


def _timed_verify(shards: Path, workers: int) -> float:
    report = verify_root(shards, workers=workers, progress=False)
    if not report.ok:
        raise RuntimeError(f"verify found problems in freshly written shards: {report.problems[:3]}")
    return report.seconds


def format_table(results: list[BenchResult]) -> str:
    lines = [
        f"{'task':<8} {'mode':<16} {'workers':>7} {'images/s':>9} {'s/1000 img':>10} {'min-max s':>11} "
        f"{'CPU ms/img':>10} {'other CPU s':>11}"
    ]
    for r in results:
        mode = (
            "full decode"
            if r.task == "verify"
            else ("pass-through" if r.max_side_px is None else f"--max-side {r.max_side_px}")
        )
        spread = f"{min(r.seconds):.2f}-{max(r.seconds):.2f}"
        lines.append(
            f"{r.task:<8} {mode:<16} {r.workers:>7} {r.images_per_s:>9.1f} {r.s_per_1000:>10.2f} {spread:>11} "
            f"{r.cpu_ms_per_image:>10.2f} {sum(r.other_cpu_seconds):>11.1f}"
        )
    return "\n".join(lines)


def write_json(path: Path, config: ConvertBenchConfig, results: list[BenchResult], num_large: int) -> None:
    from benchmarks.loaders import environment  # versions and hardware, no host names or paths

    report: dict[str, Any] = {
        "benchmark": "convert",
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
        "num_large_images": num_large,
        "environment": environment(),
        "load_average_1_5_15_min": list(os.getloadavg()),  # other work on the machine skews wall times
        "results": [
            {
                **asdict(r),
                "images_per_s": r.images_per_s,
                "s_per_1000": r.s_per_1000,
                "cpu_ms_per_image": r.cpu_ms_per_image,
            }
            for r in results
        ],
    }
    path.write_text(json.dumps(report, indent=1) + "\n")
