"""The digit grid: the label rule in numbers, three disjoint digit pools, determinism, the cached
embedded default, and the CLI end to end."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.format import LabelKind, decode_sample
from shards.manifest import load_splits, validate_split
from shards.sources import digits_grid
from shards.sources.digits_grid import (
    CENTRE_CELL,
    CENTRE_PROBABILITY,
    SPLITS,
    GridConfig,
    ensure_grid_shards,
    grid_items,
    grid_spec,
    load_digit_cells,
    split_digit_pools,
)
from shards.writer import WriterSettings, write_split

REPO = Path(__file__).resolve().parents[1]
CHI2_7DOF_P001 = 24.32  # chi-square critical value, 7 degrees of freedom, p = 0.001


@pytest.fixture(scope="module")
def many_train_grids():
    """20,000 training grids in memory (4 px cells: only labels matter here)."""
    return grid_items(GridConfig(train_size=20_000, val_size=10, cell_px=4))["train"]


def test_label_is_the_digit_at_the_label_cell_and_the_centre_with_probability_0_6(many_train_grids):
    cells = np.array([item.meta["label_cell"] for item in many_train_grids])
    assert all(item.label == item.meta["grid"][item.meta["label_cell"]] for item in many_train_grids)
    n = len(cells)
    std = np.sqrt(CENTRE_PROBABILITY * (1 - CENTRE_PROBABILITY) / n)
    assert abs(np.mean(cells == CENTRE_CELL) - CENTRE_PROBABILITY) < 4 * std


def test_other_label_cells_are_uniform_over_the_eight_neighbours(many_train_grids):
    cells = np.array([item.meta["label_cell"] for item in many_train_grids])
    counts = np.bincount(cells[cells != CENTRE_CELL], minlength=9)
    others = np.delete(counts, CENTRE_CELL)
    assert counts[CENTRE_CELL] == 0 and others.min() > 0
    expected = others.sum() / 8
    assert ((others - expected) ** 2 / expected).sum() < CHI2_7DOF_P001, others


def test_multi_label_set_is_every_digit_present_and_holds_the_label(many_train_grids):
    for item in many_train_grids:
        assert item.label_set == tuple(sorted(set(item.meta["grid"])))
        assert item.label in item.label_set


def cells_of(pixels: np.ndarray, cell_px: int) -> list[bytes]:
    """The nine cells of a grid, row-major, as raw bytes."""
    return [
        pixels[r * cell_px : (r + 1) * cell_px, c * cell_px : (c + 1) * cell_px].tobytes()
        for r in range(3)
        for c in range(3)
    ]


@pytest.mark.parametrize("seed", [0, 7])
def test_three_digit_pools_are_disjoint_cover_every_digit_and_ignore_the_seed(seed):
    num_digits = 1797
    pools = split_digit_pools(num_digits, GridConfig(seed=seed))
    ids = {split: set(pool.tolist()) for split, pool in pools.items()}
    assert sorted(ids) == sorted(SPLITS)
    assert not ids["train"] & ids["tune"] and not ids["train"] & ids["val"] and not ids["tune"] & ids["val"]
    assert ids["train"] | ids["tune"] | ids["val"] == set(range(num_digits))
    assert sum(len(pool) for pool in pools.values()) == num_digits  # no index twice inside a pool
    assert (len(ids["val"]), len(ids["tune"])) == (539, 359)  # 30 % and 20 % of the digits
    for split, pool in split_digit_pools(num_digits, GridConfig(seed=0)).items():
        assert np.array_equal(pools[split], pool)  # a re-draw (--seed) never moves a digit between pools


def test_pool_fractions_must_leave_every_pool_some_digits():
    with pytest.raises(ValueError, match="sum < 1"):
        GridConfig(val_digit_fraction=0.5, tune_digit_fraction=0.5)
    with pytest.raises(ValueError, match="empty"):
        split_digit_pools(3, GridConfig(val_digit_fraction=0.1, tune_digit_fraction=0.1))


def test_default_sizes_and_tune_size_follows_val_size():
    assert GridConfig().split_sizes() == {"train": 20000, "tune": 2000, "val": 2000}
    assert GridConfig(val_size=30).tune_size == 30 and GridConfig(val_size=30, tune_size=5).tune_size == 5


@pytest.mark.parametrize("seed", [0, 1])
def test_grids_draw_only_from_their_own_disjoint_digit_pool(seed):
    config = GridConfig(train_size=150, val_size=150, seed=seed, cell_px=16)
    cells, classes = load_digit_cells(config.cell_px)
    pools = {split: set(pool.tolist()) for split, pool in split_digit_pools(len(cells), config).items()}
    lookup = {cell.tobytes(): i for i, cell in enumerate(cells)}
    items_by_split = grid_items(config)
    assert {split: len(items) for split, items in items_by_split.items()} == {"train": 150, "tune": 150, "val": 150}
    for split, items in items_by_split.items():
        for item in items:
            digit_ids = [lookup[cell] for cell in cells_of(item.pixels, config.cell_px)]  # KeyError: not a digit
            assert set(digit_ids) <= pools[split]
            assert classes[digit_ids].tolist() == item.meta["grid"]  # labels describe the pixels


def test_same_seed_gives_the_same_grids_and_another_seed_does_not():
    def draw(seed: int) -> tuple[np.ndarray, list[int]]:
        val = grid_items(GridConfig(train_size=5, val_size=50, seed=seed, cell_px=4))["val"]
        pixels = [item.pixels for item in val if item.pixels is not None]
        assert len(pixels) == len(val)  # grid items carry pixels, not files
        return np.stack(pixels), [item.label for item in val]

    (pixels_a, labels_a), (pixels_b, labels_b), (pixels_c, _) = draw(1), draw(1), draw(2)
    assert np.array_equal(pixels_a, pixels_b) and labels_a == labels_b
    assert not np.array_equal(pixels_a, pixels_c)


def test_a_new_cell_size_rewrites_the_shards(tmp_path):
    settings = WriterSettings(progress=False)
    for cell_px in (8, 12):
        config = GridConfig(train_size=5, val_size=5, cell_px=cell_px)
        write_split(tmp_path, grid_spec("val", config), grid_items(config)["val"], settings)
    shard = load_splits(tmp_path)["val"].shards[0]
    with tarfile.open(tmp_path / shard.path) as tar:
        jpeg = tar.extractfile(tar.getmembers()[0]).read()
    assert Image.open(io.BytesIO(jpeg)).size == (36, 36)


def small_config(**changes) -> GridConfig:
    return GridConfig(**{"train_size": 12, "val_size": 6, "tune_size": 4, "cell_px": 4, **changes})


def test_ensure_grid_shards_builds_three_splits_once(tmp_path, monkeypatch):
    config = small_config()
    ensure_grid_shards(tmp_path, config)
    splits = load_splits(tmp_path)
    assert {name: s.num_samples for name, s in splits.items()} == {"train": 12, "tune": 4, "val": 6}

    def must_not_write(*args, **kwargs):
        raise AssertionError("an intact, current cache was rewritten")

    monkeypatch.setattr(digits_grid, "write_split", must_not_write)
    ensure_grid_shards(tmp_path, config)


def test_ensure_grid_shards_rebuilds_a_cache_of_another_grid_rule_or_config(tmp_path, monkeypatch):
    # A cache of the previous rule: train and val only, written under an older grid definition.
    monkeypatch.setattr(digits_grid, "GRID_DEFINITION", 1)
    items = grid_items(small_config())
    for name in ("train", "val"):
        write_split(tmp_path, grid_spec(name, small_config()), items[name], WriterSettings(progress=False))
    monkeypatch.undo()
    ensure_grid_shards(tmp_path, small_config())
    splits = load_splits(tmp_path)
    assert sorted(splits) == sorted(SPLITS)
    for name, split in splits.items():
        assert split.extra == json.loads(json.dumps(grid_spec(name, small_config()).extra))
        assert split.extra["grid"]["definition"] == digits_grid.GRID_DEFINITION > 1
        validate_split(tmp_path, name)
    ensure_grid_shards(tmp_path, small_config(seed=5))  # another config: rebuilt too, not reused
    assert all(split.extra["grid"]["seed"] == 5 for split in load_splits(tmp_path).values())


def test_cli_writes_a_manifest_with_train_tune_and_val(tmp_path):
    out = tmp_path / "grid"
    command = [
        sys.executable,
        "tools/make_shards.py",
        "digits-grid",
        "--out",
        str(out),
        "--train-size",
        "60",
        "--val-size",
        "20",
        "--tune-size",
        "15",
        "--cell-px",
        "16",
        "--shard-samples",
        "25",
        "--workers",
        "1",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    splits = load_splits(out)
    assert sorted(splits) == ["train", "tune", "val"]
    assert [s.num_samples for s in splits["train"].shards] == [25, 25, 10] and splits["val"].num_samples == 20
    assert splits["tune"].num_samples == 15 and splits["tune"].label_kind is LabelKind.MULTI
    validate_split(out, "tune")
    assert splits["val"].label_kind is LabelKind.MULTI and splits["val"].class_names == [str(d) for d in range(10)]
    validate_split(out, "val")
    with tarfile.open(out / splits["val"].shards[0].path) as tar:
        members = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()[:5]}
    sample = decode_sample("first", members)
    assert sample.label in sample.label_set and Image.open(io.BytesIO(sample.jpeg)).size == (48, 48)


def _grid_digest(config: GridConfig) -> str:
    """sha256 over every split's pixels, labels and label sets."""
    import hashlib

    digest = hashlib.sha256()
    for split, items in grid_items(config).items():
        for item in items:
            assert item.pixels is not None and item.label_set is not None  # grid items carry both
            digest.update(split.encode() + item.pixels.tobytes() + bytes([item.label]) + bytes(item.label_set))
    return digest.hexdigest()


def test_the_embedded_grid_is_unchanged_by_the_second_grids_options():
    # Pinned from the code before --jitter-px/--noise-std/--pool-seed existed: the demo's grids and
    # every setting chosen on them stay valid.
    expected = "0ab14de5e26a684f0b733a9fd2fe580deef10cc9d1dfb14ab8368e78b707cc29"
    assert _grid_digest(GridConfig(train_size=50, val_size=40, tune_size=30, seed=7)) == expected


def test_jitter_noise_and_pool_seed_make_another_grid_with_the_same_label_rule():
    base = small_config(cell_px=8, train_size=40, val_size=40)
    hard = small_config(cell_px=8, train_size=40, val_size=40, jitter_px=2, noise_std=24.0, pool_seed=1)
    plain, other = grid_items(base)["val"], grid_items(hard)["val"]
    assert not np.array_equal(plain[0].pixels, other[0].pixels)
    for item in other:  # the rule holds: label among the nine digits, label set = the digits present
        assert item.label == item.meta["grid"][item.meta["label_cell"]]
        assert item.label_set == tuple(sorted(set(item.meta["grid"])))
    noisy = np.stack([item.pixels for item in other]).astype(float)
    clean = np.stack([item.pixels for item in plain]).astype(float)
    assert (noisy == 0).mean() < (clean == 0).mean()  # noise lifts the black background
    # another pool seed: other digit images in each pool, still disjoint
    num_digits = len(load_digit_cells(4)[1])
    pools_0, pools_1 = split_digit_pools(num_digits, base), split_digit_pools(num_digits, hard)
    assert not np.array_equal(pools_0["val"], pools_1["val"])
    assert not set(pools_1["val"]) & set(pools_1["tune"]) and not set(pools_1["tune"]) & set(pools_1["train"])


def test_jitter_shifts_each_digit_inside_its_cell_only():
    rng = np.random.default_rng(0)
    tiles = np.zeros((50, 8, 8), np.uint8)
    tiles[:, 3:5, 3:5] = 255  # a 2×2 blob in the middle of each cell
    shifted = digits_grid.jittered(tiles, 2, rng)
    assert (shifted.reshape(50, -1).sum(axis=1) == 4 * 255).all()  # nothing falls off an 8 px cell at ±2
    offsets = {tuple(np.argwhere(s)[0] - (3, 3)) for s in shifted}
    assert len(offsets) > 5 and all(max(abs(dy), abs(dx)) <= 2 for dy, dx in offsets)


def test_the_cli_refuses_a_jitter_that_could_push_a_digit_out(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "make_shards.py"),
            "digits-grid",
            "--out",
            str(tmp_path / "g"),
            "--cell-px",
            "8",
            "--jitter-px",
            "4",
            "--train-size",
            "4",
            "--val-size",
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2 and "jitter_px" in result.stderr and "--jitter-px" in result.stderr
    assert not (tmp_path / "g").exists()
