"""Shared fixtures: real JPEG bytes made with PIL, small in-memory sample lists for the writer, and the
digit grid most engine tests train on. Helpers that are not fixtures live in helpers.py."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import write_grid
from PIL import Image

from shards.writer import SourceItem


def photo_pixels(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth colour gradient plus mild noise: compresses like a photo, differs per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, size=3)
    slope = rng.uniform(-2, 2, size=(2, 3))
    pixels = base + x[..., None] * slope[0] + y[..., None] * slope[1] + rng.normal(0, 6, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def image_bytes(
    width: int = 64, height: int = 48, seed: int = 0, mode: str = "RGB", fmt: str = "JPEG", **save_args
) -> bytes:
    """Encoded image bytes (``fmt`` JPEG or PNG) of a synthetic photo converted to ``mode``."""
    image = Image.fromarray(photo_pixels(width, height, seed)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def make_jpeg() -> Callable[..., bytes]:
    """``make_jpeg(width, height, seed, mode="RGB", fmt="JPEG", progressive=..., quality=...)``."""
    return image_bytes


def pixel_items(count: int, num_classes: int, multi: bool = True, seed: int = 0) -> list[SourceItem]:
    """``count`` 16×16 RGB samples in class-sorted order (class i before class i+1)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        label = i * num_classes // count
        labels = tuple(sorted({label, int(rng.integers(num_classes))})) if multi else None
        pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        items.append(SourceItem(key=f"s{i:04d}", label=label, source=f"mem/{i}", pixels=pixels, label_set=labels))
    return items


@pytest.fixture(scope="session")
def make_items() -> Callable[..., list[SourceItem]]:
    """``make_items(count, num_classes, multi=True, seed=0)``: class-sorted in-memory samples."""
    return pixel_items


@pytest.fixture(scope="session")
def grid_root(tmp_path_factory) -> Path:
    """The converted digit grid (train 640, val 160 images), built once per session: tests only read
    it; one that writes into a grid copies it first."""
    return write_grid(tmp_path_factory.mktemp("grid"))


def pytest_configure(config) -> None:
    """Under pytest-xdist (``make test PYTEST_WORKERS=N``) the workers share the cores: each runs torch
    on one thread, and the processes a test starts inherit OMP_NUM_THREADS=1."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items) -> None:
    """GPU tests run wherever CUDA is available and are skipped (with the reason) elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not ``in item.keywords``: a folder named gpu is one
            item.add_marker(skip)
