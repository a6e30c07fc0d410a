"""Semi-supervised MILe: an unlabelled split feeds the imitation phases, the labelled split the
interaction phases, each stream at its own data position (docs/DESIGN.md, "Semi-supervised runs")."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CPU, CPU_FLAGS, run_cli_in_process, run_in_process, run_stopped_by_sigterm

from engine.checkpoint import Progress, read_checkpoint
from engine.config import ConfigError, build_config
from engine.phases import STUDENT, TEACHER
from engine.run_folder import read_metrics
from engine.trainer import Trainer
from shards.format import NO_LABEL, FormatError, LabelKind
from shards.manifest import load_split
from shards.verify import verify_root

CLASSES = ("bird", "cat", "dog")
COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "bird": (40, 40, 200)}
NUM_TRAIN_IMAGES = 200  # 10 % labelled (20), 90 % unlabelled (180)
BATCH = 8  # labelled: 2 batches per epoch; unlabelled: 22


def make_shards(*args: str) -> subprocess.CompletedProcess:
    return run_in_process("tools/make_shards.py", *args, timeout=120)


def write_photos(images: Path, count: int, offset: int) -> list[tuple[str, str]]:
    """``count`` small coloured JPEGs (class = colour); (relative path, class name) of each."""
    from PIL import Image

    rng = np.random.default_rng(offset)
    written = []
    for i in range(offset, offset + count):
        name = CLASSES[i % 3]
        pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 25, (20, 24, 3)), 0, 255).astype(np.uint8)
        (images / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(images / name / f"{i}.jpg", quality=90)
        written.append((f"{name}/{i}.jpg", name))
    return written


def convert_folder(images: Path, rows: list[str], split: str, out: Path, *extra: str) -> None:
    labels = images.parent / f"{split}.csv"
    labels.write_text("\n".join(rows) + "\n")
    result = make_shards(
        "folder",
        "--images",
        str(images),
        "--labels",
        str(labels),
        "--split",
        split,
        "--out",
        str(out),
        "--workers",
        "1",
        "--shard-samples",
        "64",
        *extra,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def semi_root(tmp_path_factory) -> Path:
    """A generated folder dataset through the real converter: train (10 % of the images, labelled),
    train_unlabelled (the other 90 %, converted with --unlabelled from a label file whose labels it
    must not read) and val."""
    base = tmp_path_factory.mktemp("semi")
    images, out = base / "photos", base / "shards"
    photos = write_photos(images, NUM_TRAIN_IMAGES, 0)
    labelled = [p for i, p in enumerate(photos) if i % 10 == 0]
    unlabelled = [p for i, p in enumerate(photos) if i % 10 != 0]
    convert_folder(images, ["path,label"] + [f"{p},{c}" for p, c in labelled], "train", out)
    convert_folder(images, ["path,label"] + [f"{p},{c}" for p, c in write_photos(images, 24, 1000)], "val", out)
    convert_folder(
        images, ["path,label"] + [f"{p},{c}" for p, c in unlabelled], "train_unlabelled", out, "--unlabelled"
    )
    return out


def semi_config(root: Path, out: Path, **overrides):
    values = {
        "data.root": str(root),
        "data.unlabelled_split": "train_unlabelled",
        "data.num_workers": 0,
        "data.backend": "torch",
        "arch": "grid_cnn",
        "data.image_size_px": 16,
        "data.augment": True,
        "method.name": "mile",
        "method.k_teacher_steps": 2,
        "method.k_student_steps": 3,
        "num_steps": 13,
        "global_batch_size": BATCH,
        "eval_every": 13,
        "log_every": 1,
        "checkpoint_every": 5,
        "out_dir": str(out),
        "device": "cpu",
        **overrides,
    }
    return build_config({}, values)


def progress_of(out: Path) -> dict:
    return read_checkpoint(out / "checkpoints" / "last.pt")["components"]["progress"]


# -- the converter and the format ------------------------------------------------------------------


def test_unlabelled_split_round_trips_through_the_folder_converter_and_verify(semi_root: Path) -> None:
    from dataset_layouts import read_split

    train, unlabelled = load_split(semi_root, "train"), load_split(semi_root, "train_unlabelled")
    assert unlabelled.label_kind is LabelKind.UNLABELLED and train.label_kind is LabelKind.SINGLE
    assert unlabelled.class_names == train.class_names == list(CLASSES)
    assert (train.num_samples, unlabelled.num_samples) == (20, 180)
    samples = read_split(semi_root, "train_unlabelled")
    assert all(s.label == NO_LABEL and s.label_set is None for s in samples.values())  # no .tgt member either
    assert not set(samples) & set(read_split(semi_root, "train"))  # disjoint from the labelled images
    report = verify_root(semi_root, progress=False)
    assert report.ok, report.problems


def test_an_unlabelled_split_holds_no_label(tmp_path: Path, make_items) -> None:
    from shards.writer import SplitSpec, WriterSettings, write_split

    items = make_items(4, 3, multi=False)  # labelled items: written as unlabelled, they are refused
    with pytest.raises(FormatError, match=r"outside \[-1, 0\) \(unlabelled split\)"):
        write_split(
            tmp_path, SplitSpec("u", LabelKind.UNLABELLED, list(CLASSES)), items, WriterSettings(progress=False)
        )


def test_folder_unlabelled_needs_a_labelled_split_first(tmp_path: Path) -> None:
    images = tmp_path / "photos"
    rows = [p for p, _ in write_photos(images, 3, 0)]
    (tmp_path / "u.csv").write_text("path\n" + "\n".join(rows) + "\n")
    result = make_shards(
        "folder",
        "--images",
        str(images),
        "--labels",
        str(tmp_path / "u.csv"),
        "--split",
        "u",
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "1",
        "--unlabelled",
    )
    assert result.returncode == 2 and "holds no labelled split yet" in result.stderr, result.stderr


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_both_loaders_read_an_unlabelled_split(semi_root: Path, backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    from pipelines import LoaderConfig, build_loader

    config = LoaderConfig(batch_size=BATCH, image_size_px=16, backend=backend, num_workers=1, device="cpu")
    loader = build_loader(semi_root, "train_unlabelled", config)
    batches = list(loader.epoch(0))
    loader.close()
    assert len(batches) == 180 // BATCH
    assert all(b.targets is None and b.images.shape == (BATCH, 3, 16, 16) for b in batches)
    assert torch.cat([b.labels for b in batches]).eq(NO_LABEL).all()


# -- the config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"method.name": "softmax"},
            "data.unlabelled_split (--unlabelled-split) 'train_unlabelled': method.name (--method) softmax",
        ),
        ({"method.name": "sigmoid"}, "has no imitation phase"),
        (
            {"data.unlabelled_split": "", "data.unlabelled_root": "elsewhere"},
            "data.unlabelled_root (--unlabelled-data) needs",
        ),
    ],
)
def test_config_refuses_an_unlabelled_split_without_imitation_phases(
    semi_root: Path, tmp_path: Path, overrides, message
) -> None:
    with pytest.raises(ConfigError) as error:
        semi_config(semi_root, tmp_path / "run", **overrides)
    assert message in str(error.value)


def test_splits_that_cannot_serve_are_refused_before_work(semi_root: Path, tmp_path: Path) -> None:
    from shards.sources.digits_grid import GridConfig, grid_items, grid_spec
    from shards.writer import WriterSettings, write_split

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="data.unlabelled_split .* 'nope': .* has no split 'nope'"):
        Trainer(semi_config(semi_root, out, **{"data.unlabelled_split": "nope"}), CPU)
    with pytest.raises(ConfigError, match="data.train_split .*'train_unlabelled' is unlabelled"):
        Trainer(semi_config(semi_root, out, **{"data.train_split": "train_unlabelled"}), CPU)
    with pytest.raises(ConfigError, match="data.eval_split .*'train_unlabelled' is unlabelled"):
        Trainer(semi_config(semi_root, out, **{"data.eval_split": "train_unlabelled"}), CPU)
    grid = tmp_path / "grid"  # ten digit classes, not the three of the train split
    config = GridConfig(train_size=16, val_size=8, seed=1)
    write_split(grid, grid_spec("train", config), grid_items(config)["train"], WriterSettings(progress=False))
    with pytest.raises(ConfigError, match="has 10 classes .* not the 3 classes"):
        Trainer(
            semi_config(semi_root, out, **{"data.unlabelled_root": str(grid), "data.unlabelled_split": "train"}), CPU
        )
    assert not out.exists()


# -- training -------------------------------------------------------------------------------------------


def test_semi_supervised_run_through_the_cli_reads_each_split_in_its_phases(semi_root: Path, tmp_path: Path) -> None:
    """The acceptance run: engine-run on the converted folder; every logged step (log_every 1) says
    which split its images came from, and the checkpoint's two data positions count the steps of each phase."""
    out = tmp_path / "run"
    result = run_cli_in_process(
        "--data",
        str(semi_root),
        "--unlabelled-split",
        "train_unlabelled",
        "--method",
        "mile",
        "--k-teacher-steps",
        "2",
        "--k-student-steps",
        "3",
        "--warmup-steps",
        "0",
        "--steps",
        "13",
        "--batch-size",
        str(BATCH),
        "--image-size",
        "16",
        "--augment",
        "--log-every",
        "1",
        "--eval-every",
        "13",
        "--out",
        str(out),
        *CPU_FLAGS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["phase"] for r in train] == ["teacher"] * 2 + (["student"] * 3 + ["teacher"] * 2) * 2 + ["student"]
    for record in train:
        student = record["phase"] == "student"
        assert (record["labelled_images"], record["unlabelled_images"]) == ((0, BATCH) if student else (BATCH, 0)), (
            record
        )
        assert (record["train_top1"] is None) == student, record  # no ground truth, no accuracy
    progress = progress_of(out)
    # batches taken from each stream = steps of each phase (2 labelled and 22 unlabelled batches per epoch)
    assert progress["epoch"] * 2 + progress["batch"] == 6
    assert progress["unlabelled_epoch"] * 22 + progress["unlabelled_batch"] == 7
    assert json.loads((out / "summary.json").read_text())["num_images"] == 24


def test_student_steps_read_only_unlabelled_batches_and_teacher_steps_only_labelled(
    semi_root: Path, tmp_path: Path
) -> None:
    trainer = Trainer(semi_config(semi_root, tmp_path / "run"), CPU)
    source: dict[int, str] = {}  # id of a batch's images -> the split it was read from
    kept = []  # every batch stays alive, so no two share an id

    def tagged(loader, name):
        original = loader.epoch

        def epoch(*args, **kwargs):
            for batch in original(*args, **kwargs):
                source[id(batch.images)] = name
                kept.append(batch)
                yield batch

        return epoch

    unlabelled = trainer.unlabelled_loader
    assert unlabelled is not None
    # tag each batch with the split it came from
    trainer.train_loader.epoch = tagged(trainer.train_loader, "train")  # type: ignore[method-assign]
    unlabelled.epoch = tagged(unlabelled, "train_unlabelled")  # type: ignore[method-assign]
    seen: list[tuple[str, str, bool]] = []
    original_step = trainer.engine.train_step

    def recording_step(step, batch):
        phase = trainer.engine.plan.position(step).phase
        seen.append((phase.value, source[id(batch.images)], bool(batch.labels.eq(NO_LABEL).any())))
        return original_step(step, batch)

    trainer.engine.train_step = recording_step  # type: ignore[method-assign]  # records each step's batch
    trainer.run()
    pairs = {(phase, split) for phase, split, _ in seen}
    assert pairs == {(TEACHER.value, "train"), (STUDENT.value, "train_unlabelled")}
    assert not any(no_label for _, _, no_label in seen)  # the step sees placeholder labels, never NO_LABEL
    assert len(source) == len(seen) == 13  # no batch read that no step used


@pytest.mark.parametrize("stop_at", [8, 11])  # mid-imitation (steps 7-9 are a student phase), mid-interaction (10-11)
def test_stopped_mid_phase_and_resumed_equals_the_uninterrupted_run(
    semi_root: Path, tmp_path: Path, stop_at: int
) -> None:
    whole = Trainer(semi_config(semi_root, tmp_path / "whole"), CPU).run()
    interrupted = semi_config(semi_root, tmp_path / "cut")
    run_stopped_by_sigterm(interrupted, stop_at)
    assert progress_of(tmp_path / "cut")["step"] == stop_at
    resumed = Trainer(interrupted, CPU, resume=True).run()
    assert resumed == whole
    whole_state = read_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["components"]
    cut_state = read_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["components"]
    for name, tensor in whole_state["learner"].items():
        assert torch.equal(tensor, cut_state["learner"][name]), name
    assert whole_state["progress"] == cut_state["progress"]

    def drop_timing(record: dict) -> dict:
        return {k: v for k, v in record.items() if "per_s" not in k and "seconds" not in k and "wait" not in k}

    assert [drop_timing(r) for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == [
        drop_timing(r) for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")
    ]


def test_checkpoints_from_before_semi_supervised_runs_load_with_the_stream_at_its_start() -> None:
    progress = Progress()
    progress.load_state_dict({"step": 40, "epoch": 2, "batch": 5, "best_value": None, "best_step": -1})
    assert (progress.step, progress.epoch, progress.batch) == (40, 2, 5)
    assert (progress.unlabelled_epoch, progress.unlabelled_batch) == (0, 0)
    progress.unlabelled_epoch, progress.unlabelled_batch = 1, 3
    again = Progress()
    again.load_state_dict(progress.state_dict())
    assert (again.unlabelled_epoch, again.unlabelled_batch) == (1, 3)


def test_mile_eval_refuses_an_unlabelled_split(semi_root: Path, tmp_path: Path) -> None:
    """Scoring placeholder labels would print numbers that mean nothing: refused before any model loads."""
    from engine.commands.evaluate import evaluate_exported
    from engine.commands.export import ExportError

    with pytest.raises(ExportError, match="'train_unlabelled' .* is unlabelled"):
        evaluate_exported(tmp_path / "no-model-needed", semi_root, "train_unlabelled", torch.device("cpu"))


def test_an_unlabelled_split_is_refused_as_an_extra_eval_set(semi_root: Path, tmp_path: Path) -> None:
    config = semi_config(semi_root, tmp_path / "run", **{"data.extra_eval": (f"{semi_root}:train_unlabelled",)})
    with pytest.raises(ConfigError, match="'train_unlabelled' is unlabelled"):
        Trainer(config, CPU)
    assert not (tmp_path / "run").exists()
