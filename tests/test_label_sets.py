"""Training on label sets (``method.train_targets = label_set``): a folder given as ``path,labels``
only is converted, and sigmoid and MILe's interaction phases train BCE on each image's multi-hot set;
the default trains on the single given label (the first class listed), and the plan refuses
label sets where the data has none."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CPU, CPU_FLAGS, run_cli_in_process, run_in_process, tiny_config
from PIL import Image

import engine.steps
from engine.config import ConfigError, build_config
from engine.data import PlanError
from engine.losses import label_set_targets
from engine.plan import plan_run
from shards.format import LabelKind
from shards.writer import SplitSpec, WriterSettings, write_split

CLASSES = ("circle", "square", "star", "triangle", "cross")  # sorted: circle, cross, square, star, triangle
TRAIN_IMAGES = 16  # one batch holds the whole split: every step sees every image's targets once


def shape_folder(root: Path, count: int, seed: int) -> list[tuple[str, tuple[str, ...]]]:
    """``count`` small JPEGs, each with a set of 1-3 of CLASSES (the first listed is not always the
    alphabetically first); returns (path, listed classes) per image."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        listed = tuple(str(c) for c in rng.choice(CLASSES, size=1 + i % 3, replace=False))
        pixels = np.clip(rng.normal(128, 40, (28, 28, 3)), 0, 255).astype(np.uint8)
        name = f"img_{seed}_{i}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / name, quality=90)
        rows.append((name, listed))
    return rows


def convert_labels_only(tmp_path: Path) -> tuple[Path, list[tuple[str, tuple[str, ...]]]]:
    """A ``path,labels`` folder converted into train and val splits; returns the shards and the train rows."""
    images, shards = tmp_path / "shapes", tmp_path / "shards"
    train_rows = shape_folder(images, TRAIN_IMAGES, seed=1)
    for split, rows in (("train", train_rows), ("val", shape_folder(images, 8, seed=2))):
        labels = tmp_path / f"{split}.csv"
        labels.write_text("path,labels\n" + "".join(f"{path},{';'.join(listed)}\n" for path, listed in rows))
        result = run_in_process(
            "tools/make_shards.py",
            *("folder", "--images", str(images), "--labels", str(labels), "--split", split),
            *("--out", str(shards), "--workers", "1"),
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
    return shards, train_rows


@pytest.fixture(scope="module")
def labels_only(tmp_path_factory) -> tuple[Path, list[tuple[str, tuple[str, ...]]]]:
    return convert_labels_only(tmp_path_factory.mktemp("labelsets"))


def multi_hot(listed: tuple[str, ...]) -> tuple[float, ...]:
    names = sorted(CLASSES)
    return tuple(1.0 if name in listed else 0.0 for name in names)


def record_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[torch.Tensor]:
    """Wrap the loss ``engine.steps.NAME`` (called with logits and its targets or labels): every
    second argument it is given, as the step passes it."""
    seen: list[torch.Tensor] = []
    original = getattr(engine.steps, name)

    def recording(logits: torch.Tensor, second: torch.Tensor, *rest):
        seen.append(second.detach().clone())
        return original(logits, second, *rest)

    monkeypatch.setattr(engine.steps, name, recording)
    return seen


def train(shards: Path, out: Path, *args: str) -> None:
    result = run_cli_in_process(
        *("--data", str(shards), "--out", str(out), *CPU_FLAGS),
        *("--arch", "grid_cnn", "--image-size", "24", "--batch-size", str(TRAIN_IMAGES), "--eval-every", "100"),
        *args,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def rows_of(batch_targets: torch.Tensor) -> Counter:
    return Counter(tuple(row.tolist()) for row in batch_targets)


@pytest.mark.parametrize(
    "method_args, supervised_steps",
    [
        (("--method", "sigmoid", "--steps", "3"), 3),
        # teacher 0-1, student 2, teacher 3-4: four interaction steps on the label sets
        (("--method", "mile", "--warmup-steps", "0", "--k-teacher-steps", "2", "--k-student-steps", "1"), 4),
    ],
)
def test_sigmoid_and_mile_train_on_the_multi_hot_label_sets(
    labels_only, tmp_path, monkeypatch, method_args, supervised_steps
):
    shards, rows = labels_only
    seen = record_calls(monkeypatch, "bce_multi_hot")
    steps = () if "--steps" in method_args else ("--steps", "5")
    train(shards, tmp_path / "run", *method_args, *steps, "--train-targets", "label_set")
    assert len(seen) == supervised_steps
    expected = Counter(multi_hot(listed) for _, listed in rows)
    assert max(sum(row) for row in expected) > 1  # the sets are not single labels
    for targets in seen:  # every step sees the whole split, in some order
        assert targets.dtype == torch.float32 and rows_of(targets) == expected


def test_by_default_the_given_label_is_trained_on_and_it_is_the_first_listed_class(labels_only, tmp_path, monkeypatch):
    shards, rows = labels_only
    one_hot = record_calls(monkeypatch, "bce_one_hot")
    multi = record_calls(monkeypatch, "bce_multi_hot")
    train(shards, tmp_path / "run", "--method", "sigmoid", "--steps", "2")
    assert len(one_hot) == 2 and not multi
    first_listed = Counter(sorted(CLASSES).index(listed[0]) for _, listed in rows)
    for labels in one_hot:
        assert Counter(labels.tolist()) == first_listed


def test_label_sets_are_refused_for_a_split_without_them(make_items, tmp_path):
    spec = SplitSpec(name="train", label_kind=LabelKind.SINGLE, class_names=["a", "b", "c", "d"])
    write_split(tmp_path / "single", spec, make_items(32, 4, multi=False), WriterSettings(progress=False))
    write_split(
        tmp_path / "single", replace(spec, name="val"), make_items(8, 4, multi=False), WriterSettings(progress=False)
    )
    config = tiny_config(tmp_path / "single", tmp_path / "run", **{"method.train_targets": "label_set"})
    with pytest.raises(PlanError, match=r"train_targets \(--train-targets\) label_set: train split 'train' has no"):
        plan_run(config, CPU)
    plan_run(tiny_config(tmp_path / "single", tmp_path / "run"), CPU)  # the default trains on the single labels


def test_softmax_refuses_label_sets():
    with pytest.raises(ConfigError, match=r"train_targets \(--train-targets\) label_set: .*softmax"):
        build_config({}, {"method.name": "softmax", "method.train_targets": "label_set"})


def test_label_set_targets_add_the_given_label_so_an_empty_set_trains_on_the_label_alone():
    sets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # image 1 has an empty set (left out of the metrics)
    targets = label_set_targets(torch.tensor([0, 2]), sets)
    assert targets.tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]] and sets[1].sum() == 0  # out of place
