"""The paper's multi-label digit grid, built from scikit-learn's bundled handwritten digits.

Each image is a 3×3 grid of digits. Its label is the centre digit with probability 0.6, otherwise
the digit at one of the other eight cells chosen uniformly; its multi-label set is every digit
present. The digit images are split once, independently of ``GridConfig.seed``, into three disjoint
pools: ``train`` grids draw from the train pool, ``tune`` grids (for choosing hyperparameters) from
the tune pool, ``val`` grids from the val pool; so no seed or split choice lets tuning see a val
digit. ``seed`` re-draws the grids, never the pools. Needs no download.

A second, harder grid for checking that a setting chosen on one grid holds on another
(docs/TUNING.md): ``jitter_px`` shifts each digit inside its cell, ``noise_std`` adds Gaussian pixel
noise, ``pool_seed`` partitions the digit images into other pools. All three default to the
embedded grid's values, whose grids stay what they were.
"""

from __future__ import annotations

import json
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
SPLITS = ("train", "tune", "val")
GRID_JPEG_QUALITY = 90
# The digit-pool permutation's seed, fixed whatever GridConfig.seed is. 0 was the default seed when the
# pools followed it, so the default val pool (and the default val grids) stayed what they were.
POOL_SEED = 0
# Recorded in every split's manifest: bump it when the grid rule changes in a way GridConfig does not
# show, so ensure_grid_shards rebuilds caches made by the old rule.
GRID_DEFINITION = 3  # 2: three seed-independent pools (train, tune, val); 3: metadata key "label_set"
_GRID_STREAMS = {"train": 1, "val": 2, "tune": 3}  # each split's own random stream under one seed


@dataclass(frozen=True)
class GridConfig:
    train_size: int = 20000
    val_size: int = 2000
    tune_size: int | None = None  # None: as many tune grids as val grids
    seed: int = 0  # draws the grids (and the writer's shuffle); the digit pools never depend on it
    cell_px: int = 8  # scikit-learn digits are 8×8; a larger cell upscales them (no new detail)
    val_digit_fraction: float = 0.3  # share of the digit images reserved for val grids
    tune_digit_fraction: float = 0.2  # share reserved for tune grids; train grids get the rest
    jitter_px: int = 0  # each digit shifted by up to this many pixels in x and y inside its cell (zero fill)
    noise_std: float = 0.0  # Gaussian pixel noise, standard deviation in 0..255 units, added to every grid
    pool_seed: int = POOL_SEED  # partitions the digit images into the train/tune/val pools

    def __post_init__(self) -> None:
        tune_size = self.val_size if self.tune_size is None else self.tune_size
        object.__setattr__(self, "tune_size", tune_size)
        if min(self.train_size, self.val_size, tune_size) < 1:
            raise ValueError(
                f"train_size, val_size and tune_size must be >= 1, got "
                f"{self.train_size}, {self.val_size}, {self.tune_size}"
            )
        if not 4 <= self.cell_px <= 64:
            raise ValueError(f"cell_px must be in [4, 64], got {self.cell_px}")
        if not 0 <= self.jitter_px < self.cell_px // 2:
            raise ValueError(
                f"jitter_px must be in [0, cell_px // 2), got {self.jitter_px} with cell_px {self.cell_px}"
            )
        if not 0.0 <= self.noise_std <= 128.0:
            raise ValueError(f"noise_std must be in [0, 128] (0..255 pixel units), got {self.noise_std}")
        fractions = (self.val_digit_fraction, self.tune_digit_fraction)
        if min(fractions) <= 0.0 or sum(fractions) >= 1.0:
            raise ValueError(
                f"val_digit_fraction and tune_digit_fraction must be > 0 and leave train a share "
                f"(sum < 1), got {self.val_digit_fraction}, {self.tune_digit_fraction}"
            )

    def split_sizes(self) -> dict[str, int]:
        assert self.tune_size is not None  # set by __post_init__
        return {"train": self.train_size, "tune": self.tune_size, "val": self.val_size}


def load_digit_cells(cell_px: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 cells (N×cell_px×cell_px, white on black) and labels."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    cells = np.stack(
        [np.asarray(Image.fromarray(im).resize((cell_px, cell_px), Image.Resampling.BILINEAR)) for im in images]
    )
    return cells, digits.target.astype(np.int64)


def split_digit_pools(num_digits: int, config: GridConfig) -> dict[str, np.ndarray]:
    """Disjoint index pools ``train``, ``tune``, ``val`` over the digit images; the same for every seed."""
    order = np.random.default_rng(config.pool_seed).permutation(num_digits)
    num_val = int(round(num_digits * config.val_digit_fraction))
    num_tune = int(round(num_digits * config.tune_digit_fraction))
    pools = {"train": order[num_val + num_tune :], "tune": order[num_val : num_val + num_tune], "val": order[:num_val]}
    empty = [name for name, pool in pools.items() if len(pool) == 0]
    if empty:
        raise ValueError(
            f"digit pools {empty} are empty: {num_digits} digits with val_digit_fraction="
            f"{config.val_digit_fraction}, tune_digit_fraction={config.tune_digit_fraction}"
        )
    return pools


def make_grids(
    cells: np.ndarray, classes: np.ndarray, pool: np.ndarray, count: int, rng: np.random.Generator, config: GridConfig
):
    """``count`` grids from digit images in ``pool``: (pixels N×H×W, digit classes N×9, label cells N)."""
    picks = rng.choice(pool, size=(count, GRID_CELLS * GRID_CELLS), replace=True)
    grid_classes = classes[picks]
    other = rng.integers(0, GRID_CELLS * GRID_CELLS - 1, size=count)
    other = other + (other >= CENTRE_CELL)  # uniform over the eight non-centre cells
    label_cell = np.where(rng.random(count) < CENTRE_PROBABILITY, CENTRE_CELL, other)
    cell_px = cells.shape[1]
    tiles = cells[picks]
    if config.jitter_px:
        tiles = jittered(tiles, config.jitter_px, rng)
    tiles = tiles.reshape(count, GRID_CELLS, GRID_CELLS, cell_px, cell_px)
    pixels = tiles.transpose(0, 1, 3, 2, 4).reshape(count, GRID_CELLS * cell_px, GRID_CELLS * cell_px)
    if config.noise_std:
        noisy = pixels.astype(np.float32) + rng.normal(0.0, config.noise_std, size=pixels.shape)
        pixels = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    return pixels, grid_classes, label_cell


def jittered(tiles: np.ndarray, jitter_px: int, rng: np.random.Generator) -> np.ndarray:
    """Each cell (…×S×S) shifted by its own (dy, dx), uniform in [-jitter_px, jitter_px]; vacated pixels black."""
    flat = tiles.reshape(-1, *tiles.shape[-2:])
    shifts = rng.integers(-jitter_px, jitter_px + 1, size=(len(flat), 2))
    side = flat.shape[-1]
    padded = np.pad(flat, ((0, 0), (jitter_px, jitter_px), (jitter_px, jitter_px)))
    out = np.empty_like(flat)
    for i, (dy, dx) in enumerate(shifts):
        top, left = jitter_px - dy, jitter_px - dx
        out[i] = padded[i, top : top + side, left : left + side]
    return out.reshape(tiles.shape)


def grid_items(config: GridConfig) -> dict[str, list[SourceItem]]:
    """Source items of the ``train``, ``tune`` and ``val`` splits, deterministic for ``config.seed``."""
    cells, classes = load_digit_cells(config.cell_px)
    pools = split_digit_pools(len(cells), config)
    out = {}
    for split, count in config.split_sizes().items():
        rng = np.random.default_rng([config.seed, _GRID_STREAMS[split]])
        pixels, grid_classes, label_cell = make_grids(cells, classes, pools[split], count, rng, config)
        out[split] = [
            SourceItem(
                key=f"{split}_{i:07d}",
                label=int(grid_classes[i, label_cell[i]]),
                label_set=tuple(sorted(set(grid_classes[i].tolist()))),
                source=f"digits-grid/{split}/{i}",
                pixels=pixels[i],
                meta={"grid": grid_classes[i].tolist(), "label_cell": int(label_cell[i])},
            )
            for i in range(count)
        ]
    return out


def grid_spec(split: str, config: GridConfig) -> SplitSpec:
    # Every split carries the multi-label set: val and tune are evaluated on it, and train keeps it so
    # the label-ambiguity statistics can be inspected. Training itself reads only the single label.
    grid = {**config.__dict__, "centre_probability": CENTRE_PROBABILITY, "definition": GRID_DEFINITION}
    return SplitSpec(
        name=split, label_kind=LabelKind.MULTI, class_names=CLASS_NAMES, extra={"source": "digits-grid", "grid": grid}
    )


def ensure_grid_shards(root: Path, config: GridConfig = GridConfig()) -> Path:
    """The embedded default: build the three splits in ``root`` unless they are there intact and were
    made from this ``config`` by this grid rule (a cache of another rule or config is rebuilt)."""
    if all(_is_current(root, split, config) for split in SPLITS):
        return root
    settings = WriterSettings(seed=config.seed, workers=1, progress=False, image=ImagePolicy(quality=GRID_JPEG_QUALITY))
    for split, items in grid_items(config).items():
        write_split(root, grid_spec(split, config), items, settings)  # skips a split already complete
    return root


def _is_current(root: Path, split: str, config: GridConfig) -> bool:
    try:
        recorded = validate_split(root, split, check_hash=False).extra
    except ShardError:
        return False
    # Compared through JSON, the form the manifest stores it in.
    return recorded == json.loads(json.dumps(grid_spec(split, config).extra))
