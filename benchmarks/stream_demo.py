"""``python -m benchmarks.stream_demo``: build the digit-grid shards once, stream the train split through each backend.

A stream check, not a benchmark (``tools/bench.py loaders`` is that): one pass per backend over
the train split, in training mode without crops or flips (how the digit grid trains), printing
images/s including start-up.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from pipelines import build_loader, dali_import_error
from pipelines.contract import AugmentConfig, LoaderConfig
from shards.sources.digits_grid import GRID_CELLS, GridConfig, ensure_grid_shards

DEFAULT_OUT = Path(".cache") / "digits-grid"
GRID_PX = GRID_CELLS * GridConfig().cell_px  # the grid's own size, so no resampling is needed


def stream_once(root: Path, backend: str, batch_size: int, workers: int) -> tuple[int, float]:
    """(images, seconds) of one training pass over the train split."""
    config = LoaderConfig(
        batch_size=batch_size,
        image_size_px=GRID_PX,
        train=True,
        augment=AugmentConfig(random_resized_crop=False, flip=False),
        backend=backend,
        num_workers=workers,
    )
    start = time.perf_counter()
    loader = build_loader(root, "train", config)
    try:
        images = sum(len(batch) for batch in loader.epoch(0))
    finally:
        loader.close()
    return images, time.perf_counter() - start


def main(
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Shard folder (built there when missing)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    workers: int = typer.Option(os.cpu_count() or 1, "--workers", min=0, help="DALI threads / DataLoader processes."),
) -> None:
    ensure_grid_shards(out)
    backends = ["torch"]
    reason = dali_import_error()
    if reason is None:
        backends.insert(0, "dali")
    else:
        print(f"DALI backend skipped: {reason}")
    for backend in backends:
        images, seconds = stream_once(out, backend, batch_size, workers)
        print(
            f"{backend:>5} backend: {images} train images in {seconds:.2f} s = {images / seconds:,.0f} images/s "
            "(CPU, incl. start-up)"
        )


if __name__ == "__main__":
    typer.run(main)
