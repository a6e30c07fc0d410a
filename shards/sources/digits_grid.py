"""The paper's multi-label digit grid, built from scikit-learn's bundled handwritten digits.

Each image is a 3×3 grid of digits. Its label is the centre digit with probability 0.6, otherwise
the digit at one of the other eight cells chosen uniformly; its multi-label set is every digit
present. Train and val grids draw from disjoint pools of digit images. Needs no download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from shards.format import LabelKind
from shards.images import ImagePolicy
from shards.manifest import ShardError, validate_split
from shards.writer import SourceItem, SplitSpec, WriterSettings, write_split

GRID_CELLS = 3
CENTRE_CELL = 4  # row-major index of the middle cell
CENTRE_PROBABILITY = 0.6
NUM_DIGIT_CLASSES = 10
CLASS_NAMES = [str(d) for d in range(NUM_DIGIT_CLASSES)]
SPLITS = ("train", "val")
GRID_JPEG_QUALITY = 90


@dataclass(frozen=True)
class GridConfig:
    train_size: int = 20000
    val_size: int = 2000
    seed: int = 0
    cell_px: int = 8  # scikit-learn digits are 8×8; a larger cell upscales them (no new detail)
    val_digit_fraction: float = 0.3  # share of the digit images reserved for val grids

    def __post_init__(self) -> None:
        if self.train_size < 1 or self.val_size < 1:
            raise ValueError(f"train_size and val_size must be >= 1, got {self.train_size}, {self.val_size}")
        if not 4 <= self.cell_px <= 64:
            raise ValueError(f"cell_px must be in [4, 64], got {self.cell_px}")
        if not 0.0 < self.val_digit_fraction < 1.0:
            raise ValueError(f"val_digit_fraction must be in (0, 1), got {self.val_digit_fraction}")


def load_digit_cells(cell_px: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 cells (N×cell_px×cell_px, white on black) and labels."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    cells = np.stack([np.asarray(Image.fromarray(im).resize((cell_px, cell_px), Image.Resampling.BILINEAR)) for im in images])
    return cells, digits.target.astype(np.int64)


def split_digit_pools(num_digits: int, config: GridConfig) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint index pools (train, val) over the digit images."""
    order = np.random.default_rng(config.seed).permutation(num_digits)
    num_val = int(round(num_digits * config.val_digit_fraction))
    return order[num_val:], order[:num_val]


def make_grids(cells: np.ndarray, classes: np.ndarray, pool: np.ndarray, count: int, rng: np.random.Generator):
    """``count`` grids from digit images in ``pool``: (pixels N×H×W, digit classes N×9, label cells N)."""
    picks = rng.choice(pool, size=(count, GRID_CELLS * GRID_CELLS), replace=True)
    grid_classes = classes[picks]
    other = rng.integers(0, GRID_CELLS * GRID_CELLS - 1, size=count)
    other = other + (other >= CENTRE_CELL)  # uniform over the eight non-centre cells
    label_cell = np.where(rng.random(count) < CENTRE_PROBABILITY, CENTRE_CELL, other)
    cell_px = cells.shape[1]
    tiles = cells[picks].reshape(count, GRID_CELLS, GRID_CELLS, cell_px, cell_px)
    pixels = tiles.transpose(0, 1, 3, 2, 4).reshape(count, GRID_CELLS * cell_px, GRID_CELLS * cell_px)
    return pixels, grid_classes, label_cell


def grid_items(config: GridConfig) -> dict[str, list[SourceItem]]:
    """Source items of the ``train`` and ``val`` splits, deterministic for ``config.seed``."""
    cells, classes = load_digit_cells(config.cell_px)
    train_pool, val_pool = split_digit_pools(len(cells), config)
    out = {}
    for split, pool, count, stream in (("train", train_pool, config.train_size, 1), ("val", val_pool, config.val_size, 2)):
        rng = np.random.default_rng([config.seed, stream])
        pixels, grid_classes, label_cell = make_grids(cells, classes, pool, count, rng)
        out[split] = [
            SourceItem(
                key=f"{split}_{i:07d}",
                label=int(grid_classes[i, label_cell[i]]),
                labels=tuple(sorted(set(grid_classes[i].tolist()))),
                source=f"digits-grid/{split}/{i}",
                pixels=pixels[i],
                meta={"grid": grid_classes[i].tolist(), "label_cell": int(label_cell[i])},
            )
            for i in range(count)
        ]
    return out


def grid_spec(split: str, config: GridConfig) -> SplitSpec:
    # Both splits carry the multi-label set: val is evaluated on it, and train keeps it so the
    # label-ambiguity statistics can be inspected. Training itself reads only the single label.
    return SplitSpec(
        name=split,
        label_kind=LabelKind.MULTI,
        class_names=CLASS_NAMES,
        extra={"source": "digits-grid", "grid": {**config.__dict__, "centre_probability": CENTRE_PROBABILITY}},
    )


def ensure_grid_shards(root: Path, config: GridConfig = GridConfig()) -> Path:
    """The embedded default: build both splits in ``root`` unless they are already there intact."""
    try:
        for split in SPLITS:
            validate_split(root, split, check_hash=False)
        return root
    except ShardError:
        pass
    settings = WriterSettings(seed=config.seed, workers=1, progress=False, image=ImagePolicy(quality=GRID_JPEG_QUALITY))
    for split, items in grid_items(config).items():
        write_split(root, grid_spec(split, config), items, settings)
    return root
