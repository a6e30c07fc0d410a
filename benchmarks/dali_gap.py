"""Where the DALI CPU backend's time goes: the project's loader and a plain DALI CPU pipeline side by
side, then variants of the project's pipeline that each remove one difference from the plain one.

The plain pipeline is the one in NVIDIA's examples: ``fn.readers.webdataset`` (images only) ->
``fn.decoders.image_random_crop`` -> ``fn.resize`` -> ``fn.crop_mirror_normalize`` (float32, CHW),
one pipeline for the whole run, its iterator reset at each epoch end. The project's loader differs
in: the label field it reads too, HWC output, ``DaliLoader._to_batch`` (permute to the channels-last
NCHW view, labels to int64), a new pipeline per epoch seeded from (seed, epoch, rank) (which also
refills the shuffle buffer each epoch), and its ``initial_fill``. The row "runs queued past epoch
end" is the backend as it was before ``EpochIterator``: DALI's iterator kept queueing runs past
the epoch's last batch, which a per-epoch pipeline then discards. A variant row is the project's
graph (rebuilt here from the same DALI calls, its fidelity checked by the "replica" row) with one of
those switched to the plain pipeline's choice. Extra rows weigh the output dtype choices of
half-precision runs (float32 + cast, float16 + cast, uint8 + normalisation in torch).

Data and timing as ``benchmarks.loaders``: the same synthetic ~500x375 photo JPEGs in one shard,
same threads, batch and image size for every row, one warm-up epoch, then rounds in which every
row times one epoch, so load from other processes hits all rows alike; each row's ratio to the
plain pipeline is taken within a round, and the median over rounds is reported.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.loaders import (
    PLAIN_DALI,
    SPLIT,
    LoaderBenchConfig,
    TimedLoader,
    backend_loader,
    photo_jpegs,
    select_rows,
    time_epoch,
    write_bench_data,
    write_report,
)
from pipelines.contract import IMAGENET_MEAN, IMAGENET_STD, Batch
from shards.format import FIELD_IMAGE, FIELD_LABEL
from shards.manifest import load_split

PROJECT = "project DALI CPU backend"
PLAIN = PLAIN_DALI  # also the DALI backend's reference row in tools/bench.py loaders
DALI_DEFAULT_FILL = 1024  # fn.readers.webdataset's initial_fill default


@dataclass(frozen=True)
class Variant:
    """One pipeline set-up; the defaults are the project's loader, as the benchmark configures it."""

    name: str
    read_labels: bool = True  # the project reads KEY.lbl with every image
    layout: str = "HWC"  # crop_mirror_normalize's output layout (the plain pipeline: CHW)
    output: str = "float32"  # what DALI writes: float32, float16 or uint8 (then normalised in torch)
    batch_dtype: torch.dtype = torch.float32  # what the batch handed out holds
    to_batch: bool = True  # DaliLoader._to_batch: NCHW view, cast to batch_dtype, labels to int64
    rebuild_per_epoch: bool = True  # a new pipeline (and shuffle-buffer fill) every epoch
    initial_fill: int | None = None  # None: the bench's num_images, as the loaders bench passes
    prefetch_depth: int = 2  # DALI's default prefetch_queue_depth
    # rebuilt pipelines: no run scheduled past the epoch's last batch (DaliLoader's EpochIterator)
    stop_at_epoch_end: bool = True


def variants() -> list[Variant]:
    """The replica of the project's set-up, the plain pipeline, and one-difference-removed rows."""
    replica = Variant("replica of the project's pipeline")
    return [
        replica,
        Variant(
            PLAIN,
            read_labels=False,
            layout="CHW",
            to_batch=False,
            rebuild_per_epoch=False,
            initial_fill=DALI_DEFAULT_FILL,
        ),
        replace(replica, name="project - label field", read_labels=False),
        replace(replica, name="project - HWC (CHW output)", layout="CHW", to_batch=False),
        replace(replica, name="project - _to_batch", to_batch=False),
        replace(replica, name="project - per-epoch rebuild", rebuild_per_epoch=False),
        replace(replica, name="project, runs queued past epoch end", stop_at_epoch_end=False),  # before the fix
        replace(replica, name="project - fill = DALI default", initial_fill=DALI_DEFAULT_FILL),
        replace(replica, name="project, prefetch depth 1", prefetch_depth=1),
        replace(replica, name="project, prefetch depth 3", prefetch_depth=3),
        replace(replica, name="bf16: float32 out + cast", batch_dtype=torch.bfloat16),
        replace(replica, name="bf16: float16 out + cast", output="float16", batch_dtype=torch.bfloat16),
        replace(replica, name="bf16: uint8 out + torch normalise", output="uint8", batch_dtype=torch.bfloat16),
    ]


class VariantLoader:
    """A DALI CPU loader built per ``Variant``; ``epoch(e)`` yields ``Batch``es (or raw image tensors)."""

    def __init__(self, shards: Path, variant: Variant, bench: LoaderBenchConfig) -> None:
        manifest = load_split(shards, SPLIT)
        self.paths = [str(shards / s.path) for s in manifest.shards]
        self.index_paths = [str(shards / s.index_path) for s in manifest.shards]
        self.variant, self.bench = variant, bench
        self.fill = variant.initial_fill or bench.num_images
        self.iterator = None if variant.rebuild_per_epoch else self._new_iterator(0)
        from pipelines.transforms import normalisation

        self.scale, self.bias = normalisation(IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"))

    def _new_iterator(self, epoch: int) -> Any:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe = gap_pipeline(
            self,
            batch_size=self.bench.batch_size,
            num_threads=self.bench.workers,
            device_id=None,
            seed=self.bench.seed * 1000 + epoch,
            prefetch_queue_depth=self.variant.prefetch_depth,
        )
        from pipelines.dali_backend import EpochIterator

        outputs = ["images", "labels"] if self.variant.read_labels else ["images"]
        if self.variant.rebuild_per_epoch and self.variant.stop_at_epoch_end:
            runs = self.bench.num_images // self.bench.batch_size
            return EpochIterator(pipe, outputs, runs, reader_name="Reader", last_batch_policy=LastBatchPolicy.DROP)
        return DALIGenericIterator(
            [pipe],
            outputs,
            reader_name="Reader",
            last_batch_policy=LastBatchPolicy.DROP,
            auto_reset=not self.variant.rebuild_per_epoch,
        )

    def epoch(self, epoch: int) -> Iterator[Any]:
        iterator = self.iterator or self._new_iterator(epoch)
        for outputs in iterator:
            # (images,): what the plain pipeline's user gets; time_epoch counts its first dimension
            yield self._finish(outputs[0]) if self.variant.to_batch else (outputs[0]["images"],)

    def _finish(self, outputs: dict[str, torch.Tensor]) -> Batch:
        """As ``DaliLoader._to_batch``; uint8 output is normalised here as the torch backend does."""
        from pipelines.transforms import normalise

        images = outputs["images"]
        if images.dtype == torch.uint8:
            images = normalise(images, self.scale, self.bias, self.variant.batch_dtype)
        else:
            images = images.permute(0, 3, 1, 2)
            if images.dtype != self.variant.batch_dtype:
                images = images.to(self.variant.batch_dtype)
        labels = outputs["labels"].view(-1).to(torch.int64) if "labels" in outputs else torch.empty(images.shape[0])
        return Batch(images=images, labels=labels)

    def close(self) -> None:
        self.iterator = None


def _gap_pipeline_graph(loader: VariantLoader) -> Any:
    """The project's train graph (``pipelines.dali_backend``) with the variant's switches."""
    from nvidia.dali import fn, types

    from pipelines.transforms import CROP_ATTEMPTS

    v = loader.variant
    exts = [FIELD_IMAGE, FIELD_LABEL] if v.read_labels else [FIELD_IMAGE]
    read = fn.readers.webdataset(
        paths=loader.paths,
        index_paths=loader.index_paths,
        ext=exts,
        dtypes=[types.UINT8, types.INT32][: len(exts)],
        missing_component_behavior="error",
        random_shuffle=True,
        initial_fill=loader.fill,
        name="Reader",
    )
    jpegs, *labels = read if isinstance(read, list) else [read]
    size = loader.bench.image_size_px
    images = fn.decoders.image_random_crop(
        jpegs,
        device="cpu",
        output_type=types.RGB,
        random_area=[0.08, 1.0],
        random_aspect_ratio=[3 / 4, 4 / 3],
        num_attempts=CROP_ATTEMPTS,
    )
    images = fn.resize(images, resize_x=size, resize_y=size)
    mirror = fn.random.coin_flip(probability=0.5)
    if v.output == "uint8":
        images = fn.flip(images, horizontal=mirror)  # no normalisation in DALI: uint8 HWC
    else:
        dtype = types.FLOAT16 if v.output == "float16" else types.FLOAT
        images = fn.crop_mirror_normalize(
            images,
            mirror=mirror,
            mean=[255 * m for m in IMAGENET_MEAN],
            std=[255 * s for s in IMAGENET_STD],
            dtype=dtype,
            output_layout=v.layout,
        )
    return (images, *labels)


def gap_pipeline(loader: VariantLoader, **pipeline_args: Any) -> Any:
    from nvidia.dali import pipeline_def

    return pipeline_def(lambda: _gap_pipeline_graph(loader))(**pipeline_args)


@dataclass
class GapRow:
    name: str
    images_per_s: list[float] = field(default_factory=list)
    cpu_ms_per_image: list[float] = field(default_factory=list)
    ratio_to_plain: list[float] = field(default_factory=list)  # within each round

    def median(self, values: list[float]) -> float | None:
        return statistics.median(values) if values else None


def run_dali_gap(bench: LoaderBenchConfig, rows_named: tuple[str, ...] = ()) -> list[GapRow]:
    """Build the data, then time the project's loader and every variant in interleaved rounds;
    ``rows_named``: only the rows whose names contain one of these (the plain pipeline always runs)."""
    with tempfile.TemporaryDirectory(prefix="bench-dali-gap-") as tmp:
        root = Path(tmp)
        write_bench_data(root, photo_jpegs(bench.num_images, bench.seed))
        factories: list[tuple[str, Callable[[], TimedLoader]]] = [
            (PROJECT, lambda: backend_loader(root, bench, "dali", "cpu"))
        ]
        factories += [(v.name, functools.partial(VariantLoader, root / "shards", v, bench)) for v in variants()]
        factories = select_rows(factories, rows_named, PLAIN)
        rows, loaders = [GapRow(name) for name, _ in factories], [factory() for _, factory in factories]
        try:
            for epoch in range(bench.warmup_epochs + bench.repeats):
                timings = {row.name: time_epoch(loader, epoch, "cpu") for row, loader in zip(rows, loaders)}
                if epoch >= bench.warmup_epochs:
                    _record(rows, timings)
        finally:
            for loader in loaders:
                loader.close()
        return rows


def _record(rows: list[GapRow], timings: dict[str, tuple[float, float]]) -> None:
    plain_rate = timings[PLAIN][0]
    for row in rows:
        rate, cpu_ms = timings[row.name]
        row.images_per_s.append(rate)
        row.cpu_ms_per_image.append(cpu_ms)
        row.ratio_to_plain.append(rate / plain_rate)


def format_table(rows: list[GapRow]) -> str:
    lines = [f"{'pipeline':<40} {'median img/s':>12} {'min':>7} {'max':>7} {'x plain':>8} {'CPU ms/img':>10}"]
    for r in rows:
        rates = r.images_per_s
        lines.append(
            f"{r.name:<40} {r.median(rates):>12.1f} {min(rates):>7.1f} {max(rates):>7.1f} "
            f"{r.median(r.ratio_to_plain):>8.3f} {r.median(r.cpu_ms_per_image):>10.2f}"
        )
    return "\n".join(lines)


def write_json(path: Path, bench: LoaderBenchConfig, rows: list[GapRow], env: dict[str, Any]) -> None:
    write_report(path, "dali-gap", bench, "rows", rows, env)
