"""Where the torch backend's CPU time goes: the project's loader and the plain torchvision DataLoader
side by side, then variants of the project's loader that each put back or take away one difference.

The plain row is ``benchmarks.loaders.TorchvisionFolderLoader`` (the torch backend's reference in
``tools/bench.py loaders``): ``ImageFolder`` reading JPEG files, ``decode_jpeg``, v2 transforms and
normalisation per image in the workers, default collation. The project's loader (CPU device) reads
a planned batch per worker item with ``pread`` through the ``.idx`` offsets, draws each sample's crop
and flip from a numpy generator seeded by (seed, epoch, index), and normalises image by image in the
workers into a batch allocated in shared memory. A variant row is the project's loader with one of
these switched:

- "gc.collect every epoch", "normalise in the main process", "batch outside shared memory": the
  three things this loader did before issue 21, one at a time, and all three together;
- "one generator per worker": no per-sample seeding (measures what the exact-resume seeding costs;
  the images then depend on the workers, so the loader could not do this);
- "JPEG files instead of pread": each image read from its file in the image folder, as the plain
  row reads it.

The last row is the host side of the GPU-decode path (``decode_on_device``, what the loader does
on CUDA) without any device work: workers read the bytes only and pack them, the main process
splits the packed batch, reads each JPEG's size from its header (as a device decoder does first),
draws each sample's crop window and flip from its generator, and hands out an empty ``meta`` batch.
Not in it: nvJPEG's own host work and the dispatch of the per-image device operations (crop,
resize, flip: torchvision's Python and the CUDA launches; no GPU here, and ``meta`` tensors would
time torch's Python shape functions instead, ~0.3 ms per image). The row records beside it the
project's per-image transform run on 16×16 stand-ins to 8×8 (``stand_in_transform_us``): the
generator, its draws and the dispatch of every per-image operation, with almost no pixel work.

Data and timing as ``benchmarks.loaders``: the same synthetic ~500x375 photo JPEGs, same workers,
batch and image size for every row, one warm-up round, then rounds in which every row times one
epoch; each row's ratio to the plain row is taken within a round, and the median over rounds is
reported, with the CPU ms per image of the whole process tree and of the main process alone.
"""

from __future__ import annotations

import functools
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.loaders import (
    PLAIN_TORCHVISION,
    SPLIT,
    LoaderBenchConfig,
    TimedLoader,
    TorchvisionFolderLoader,
    backend_loader,
    photo_jpegs,
    select_rows,
    time_epoch,
    write_bench_data,
    write_report,
)
from pipelines.contract import Batch, LoaderConfig
from pipelines.torch_backend import BatchReader, TorchLoader, decode_or_raise
from pipelines.transforms import RandomResizedCrop, sample_rng, transform_spec
from shards.manifest import load_split
from shards.tar_io import read_index, split_name

PROJECT = "project torch backend"
PLAIN = PLAIN_TORCHVISION
HOST_SIDE = "host side of GPU decode (no device work)"


@dataclass(frozen=True)
class TorchVariant:
    """One switch set on the project's loader; the defaults are the loader as it is."""

    name: str
    gc_every_epoch: bool = False  # gc.collect() before every epoch, not only before the workers fork
    normalise_in_main: bool = False  # workers hand over uint8; the main process normalises the batch
    batch_outside_shared_memory: bool = False  # the batch is copied into shared memory when handed over
    generator_per_worker: bool = False  # one generator per worker instead of one per (seed, epoch, index)
    read_files: bool = False  # JPEG bytes from the image folder's files instead of pread from the tar
    host_side_only: bool = False  # the GPU-decode path without its device work


def variants() -> list[TorchVariant]:
    """The three things the loader did before issue 21, one at a time and together, then the rows
    that weigh its other differences from the plain row, then the GPU-decode path's host side."""
    return [
        TorchVariant("project, gc.collect every epoch", gc_every_epoch=True),
        TorchVariant("project, normalise in the main process", normalise_in_main=True),
        TorchVariant("project, batch outside shared memory", batch_outside_shared_memory=True),
        TorchVariant(
            "project as before issue 21 (all three)",
            gc_every_epoch=True,
            normalise_in_main=True,
            batch_outside_shared_memory=True,
        ),
        TorchVariant("project, one generator per worker", generator_per_worker=True),
        TorchVariant("project, JPEG files instead of pread", read_files=True),
        TorchVariant(HOST_SIDE, host_side_only=True),
    ]


class VariantReader(BatchReader):
    """``BatchReader`` with the variant's switches (set by ``VariantTorchLoader`` before the workers fork)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.variant = TorchVariant("project")
        self.image_paths: list[str] = []
        self._worker_rng: np.random.Generator | None = None

    def _new_batch(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.variant.batch_outside_shared_memory:
            return torch.empty(shape, dtype=dtype)
        return super()._new_batch(shape, dtype)

    def _encoded(self, indices: list[int]) -> list[torch.Tensor]:
        if not self.variant.read_files:
            return super()._encoded(indices)
        from torchvision.io import read_file

        return [read_file(self.image_paths[i]) for i in indices]

    def _decode_one(self, data: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        if not self.variant.generator_per_worker:
            return super()._decode_one(data, epoch, index)
        if self._worker_rng is None:
            self._worker_rng = np.random.default_rng(os.getpid())
        return self.spec.torch_image(decode_or_raise(self.spec.decode, data, index, self.reader), self._worker_rng)


class VariantTorchLoader(TorchLoader):
    """The project's ``TorchLoader`` (CPU) with one ``TorchVariant``'s switches."""

    reader_class = VariantReader

    def __init__(self, root: Path, variant: TorchVariant, bench: LoaderBenchConfig) -> None:
        config = LoaderConfig(
            batch_size=bench.batch_size,
            image_size_px=bench.image_size_px,
            train=True,
            backend="torch",
            num_workers=bench.workers,
            seed=bench.seed,
            device="cpu",
        )
        super().__init__(root / "shards", load_split(root / "shards", SPLIT), config, variant.host_side_only)
        self.variant = variant
        reader = self._reader
        assert isinstance(reader, VariantReader)
        reader.variant, reader.image_paths = variant, folder_paths(root, self.table.index_paths)
        if variant.normalise_in_main:
            self._normalise_in_workers = reader.normalise = False
        if variant.host_side_only:
            self._normalise = self._spec.normalize.torch_normaliser(torch.device("meta"))

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        if self.variant.gc_every_epoch and self.num_workers > 0:
            gc.collect()  # what TorchLoader.epoch did before every epoch
        return super().epoch(epoch, start_batch)

    def _decode_batch(self, encoded: list[torch.Tensor], indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """The host's share of ``TorchLoader._decode_batch`` for the bench's random crop and flip:
        each JPEG's size, then the sample's generator and its draws; an empty batch out."""
        if not self.variant.host_side_only:
            return super()._decode_batch(encoded, indices, epoch)
        crop = self._spec.steps[0]
        assert isinstance(crop, RandomResizedCrop), "the bench trains with a random-resized crop and a flip"
        for data, index in zip(encoded, indices.tolist()):
            rng = sample_rng(self.config.seed, epoch, index)
            crop.box(*jpeg_size(data), rng)
            rng.random()  # the flip's draw
        size = crop.size_px
        return torch.empty((len(encoded), size, size, 3), dtype=torch.uint8, device="meta")


def folder_paths(root: Path, index_paths: tuple[str, ...]) -> list[str]:
    """The image folder's file of every sample, in the shards' file order (the writer shuffles)."""
    keys = [split_name(members[0].name)[0] for path in index_paths for members in read_index(Path(path))]
    return [str(next((root / "folder").glob(f"*/{key}.jpg"))) for key in keys]


def jpeg_size(data: torch.Tensor) -> tuple[int, int]:
    """(height, width) from a JPEG's frame header, as a device decoder reads it before decoding."""
    raw = data.numpy().tobytes()
    position = 2  # after SOI
    while position + 9 < len(raw):
        marker, length = raw[position + 1], int.from_bytes(raw[position + 2 : position + 4], "big")
        if 0xC0 <= marker <= 0xC3:  # SOF0-SOF3: precision, height, width follow the length
            return (
                int.from_bytes(raw[position + 5 : position + 7], "big"),
                int.from_bytes(raw[position + 7 : position + 9], "big"),
            )
        position += 2 + length
    raise ValueError("JPEG without a frame header")


@dataclass
class TorchGapRow:
    name: str
    images_per_s: list[float] = field(default_factory=list)
    cpu_ms_per_image: list[float] = field(default_factory=list)  # the process tree
    main_cpu_ms_per_image: list[float] = field(default_factory=list)  # the main process alone
    ratio_to_plain: list[float] = field(default_factory=list)  # within each round
    stand_in_transform_us: float | None = None  # the host-side row only (module docstring)

    def median(self, values: list[float]) -> float | None:
        return statistics.median(values) if values else None


def run_torch_gap(bench: LoaderBenchConfig, rows_named: tuple[str, ...] = ()) -> list[TorchGapRow]:
    """Build the data, then time the project's loader, the plain row and every variant in
    interleaved rounds; ``rows_named``: only rows whose names contain one of these (plain always)."""
    with tempfile.TemporaryDirectory(prefix="bench-torch-gap-") as tmp:
        root = Path(tmp)
        write_bench_data(root, photo_jpegs(bench.num_images, bench.seed))
        factories: list[tuple[str, Callable[[], TimedLoader]]] = [
            (PROJECT, lambda: backend_loader(root, bench, "torch", "cpu")),
            (PLAIN, lambda: TorchvisionFolderLoader(root, bench)),
        ]
        factories += [(v.name, functools.partial(VariantTorchLoader, root, v, bench)) for v in variants()]
        factories = select_rows(factories, rows_named, PLAIN)
        rows, loaders = [TorchGapRow(name) for name, _ in factories], [factory() for _, factory in factories]
        images_per_epoch = bench.num_images // bench.batch_size * bench.batch_size
        try:
            for epoch in range(bench.warmup_epochs + bench.repeats):
                timings = {row.name: _time(loader, epoch, images_per_epoch) for row, loader in zip(rows, loaders)}
                if epoch >= bench.warmup_epochs:
                    _record(rows, timings)
        finally:
            for loader in loaders:
                loader.close()
        for row in rows:
            if row.name == HOST_SIDE:
                row.stand_in_transform_us = stand_in_transform_us(bench.seed)
        return rows


def stand_in_transform_us(seed: int, count: int = 2000) -> float:
    """CPU microseconds per image of the training transform (random-resized crop to 8 px and flip)
    on a 16×16 image: the host's per-image work and dispatch, with almost nothing to compute."""
    spec = transform_spec(LoaderConfig(batch_size=1, image_size_px=8, train=True, backend="torch", device="cpu"))
    stand_in = torch.zeros((3, 16, 16), dtype=torch.uint8)
    start = time.process_time()
    for index in range(count):
        spec.torch_image(stand_in, sample_rng(seed, 0, index))
    return 1e6 * (time.process_time() - start) / count


def _time(loader: TimedLoader, epoch: int, images_per_epoch: int) -> tuple[float, float, float]:
    """``time_epoch``'s (images/s, CPU ms per image) and the main process's CPU ms per image."""
    main_start = time.process_time()
    rate, cpu_ms = time_epoch(loader, epoch, "cpu")
    return rate, cpu_ms, 1000.0 * (time.process_time() - main_start) / images_per_epoch


def _record(rows: list[TorchGapRow], timings: dict[str, tuple[float, float, float]]) -> None:
    plain_rate = timings[PLAIN][0]
    for row in rows:
        rate, cpu_ms, main_cpu_ms = timings[row.name]
        row.images_per_s.append(rate)
        row.cpu_ms_per_image.append(cpu_ms)
        row.main_cpu_ms_per_image.append(main_cpu_ms)
        row.ratio_to_plain.append(rate / plain_rate)


def format_table(rows: list[TorchGapRow]) -> str:
    lines = [
        f"{'loader':<48} {'median img/s':>12} {'min':>7} {'max':>7} {'x plain':>8} "
        f"{'CPU ms/img':>10} {'main ms/img':>11}"
    ]
    for r in rows:
        rates = r.images_per_s
        lines.append(
            f"{r.name:<48} {r.median(rates):>12.1f} {min(rates):>7.1f} {max(rates):>7.1f} "
            f"{r.median(r.ratio_to_plain):>8.3f} {r.median(r.cpu_ms_per_image):>10.2f} "
            f"{r.median(r.main_cpu_ms_per_image):>11.2f}"
        )
        if r.stand_in_transform_us is not None:
            lines.append(
                f"  + per-image transform on 16x16 stand-ins (draws, dispatch): {r.stand_in_transform_us:.1f} us"
            )
    return "\n".join(lines)


def write_json(path: Path, bench: LoaderBenchConfig, rows: list[TorchGapRow], env: dict[str, Any]) -> None:
    write_report(path, "torch-gap", bench, "rows", rows, env)
