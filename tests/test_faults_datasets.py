"""Faults met by the converters' output folder (issue 19): converting into a folder that holds
another dataset (item 5), a hand-edited ``manifest.json`` (item 6), and misleading messages (item 9:
a split name that is a path, a read-only file system, a killed run's temporary files). Every case
goes through ``make-shards`` (``shards.cli.main``) and ends in one line naming the file or option."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dataset_layouts import jpeg_bytes, write
from shards_cli import run_main

from shards.format import LabelKind
from shards.manifest import load_splits, manifest_path
from shards.writer import SourceItem, SplitSpec, WriterSettings, write_split

REPO = Path(__file__).resolve().parents[1]


def folder_dataset(root: Path, labels: list[str]) -> tuple[Path, Path]:
    """``root/images`` with one JPEG per label and ``root/labels.csv`` listing them."""
    images = root / "images"
    for i in range(len(labels)):
        write(images / f"img{i}.jpg", jpeg_bytes(i))
    csv = root / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"img{i}.jpg,{label}\n" for i, label in enumerate(labels)))
    return images, csv


def folder_args(images: Path, labels: Path, out: Path, split: str = "train", *extra: str) -> list[str]:
    return ["folder", "--images", str(images), "--labels", str(labels), "--out", str(out), "--split", split,
            "--workers", "1", *extra]  # fmt: skip


def grid_args(out: Path, *extra: str) -> list[str]:
    sizes = ["--train-size", "6", "--val-size", "3", "--tune-size", "3", "--cell-px", "4", "--workers", "1"]
    return ["digits-grid", "--out", str(out), *sizes, *extra]


def one_line_error(status: int, output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line]
    assert status == 2 and "Traceback" not in output and lines and lines[-1].startswith("error: "), output
    return lines[-1]


# --- item 5: a folder holding another dataset ----------------------------------------------------


def test_converting_into_another_datasets_folder_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert run_main(monkeypatch, capsys, *grid_args(out))[0] == 0
    before = manifest_path(out).read_bytes()
    images, labels = folder_dataset(tmp_path, ["0", "1", "2", "1"])  # integer labels the grid's classes would take
    line = one_line_error(*run_main(monkeypatch, capsys, *folder_args(images, labels, out)))
    assert str(manifest_path(out)) in line and "another dataset" in line and "--overwrite" in line, line
    assert manifest_path(out).read_bytes() == before


def test_overwrite_replaces_the_other_dataset_and_keeps_a_users_files(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert run_main(monkeypatch, capsys, *grid_args(out))[0] == 0
    (out / "tune" / "my_notes.txt").write_text("mine")
    images, labels = folder_dataset(tmp_path, ["0", "1", "2", "1"])
    status, output = run_main(monkeypatch, capsys, *folder_args(images, labels, out, "train", "--overwrite"))
    assert status == 0, output
    splits = load_splits(out)
    assert sorted(splits) == ["train"] and splits["train"].class_names == ["0", "1", "2"]
    assert not (out / "val").exists() and sorted(p.name for p in (out / "tune").iterdir()) == ["my_notes.txt"]


def test_another_converter_with_other_classes_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    images, labels = folder_dataset(tmp_path, ["cat", "dog"])
    assert run_main(monkeypatch, capsys, *folder_args(images, labels, out, "mine"))[0] == 0
    line = one_line_error(*run_main(monkeypatch, capsys, *grid_args(out)))
    assert "split 'mine' of another dataset (class 0 is '0' in the new split 'train', 'cat' in split 'mine')" in line, (
        line
    )
    assert sorted(load_splits(out)) == ["mine"] and not (out / "train").exists()


def test_a_second_split_of_the_same_dataset_is_welcome(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    images, labels = folder_dataset(tmp_path, ["cat", "dog", "cat"])
    assert run_main(monkeypatch, capsys, *folder_args(images, labels, out, "train"))[0] == 0
    val = tmp_path / "val.csv"
    val.write_text("path,label\nimg0.jpg,dog\n")  # a subset of the classes: takes train's class list
    assert run_main(monkeypatch, capsys, *folder_args(images, val, out, "val"))[0] == 0
    assert load_splits(out)["val"].class_names == ["cat", "dog"]


def test_verify_refuses_splits_whose_classes_differ(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    settings = WriterSettings(progress=False)
    for split, classes in (("train", ["cat", "dog"]), ("val", ["cat", "owl"])):  # as an older converter left it
        item = SourceItem(key="a", label=0, source="a.jpg", path=str(write(tmp_path / f"{split}.jpg", jpeg_bytes(1))))
        write_split(out, SplitSpec(split, LabelKind.SINGLE, classes), [item], settings)
    status, output = run_main(monkeypatch, capsys, "verify", str(out), "--workers", "1")
    assert (
        status == 1
        and "splits 'train' and 'val' have different classes (class 1 is 'dog' in 'train', 'owl' in 'val')" in output
    ), output


# --- item 6: manifest.json read back is validated like a flag -----------------------------------


@pytest.fixture
def converted(tmp_path, monkeypatch, capsys) -> Path:
    out = tmp_path / "out"
    images, labels = folder_dataset(tmp_path, ["cat", "dog", "cat", "dog"])
    assert run_main(monkeypatch, capsys, *folder_args(images, labels, out, "train", "--shard-samples", "2"))[0] == 0
    assert run_main(monkeypatch, capsys, *folder_args(images, labels, out, "val"))[0] == 0
    return out


def _set(path: list, value):
    def edit(data: dict) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _rename_split(data: dict) -> None:
    data["splits"]["../x"] = data["splits"].pop("val")


def _point_into_val(data: dict) -> None:
    data["splits"]["train"]["shards"][0]["path"] = data["splits"]["val"]["shards"][0]["path"]


@pytest.mark.parametrize(
    "edit, key",
    [
        (_set(["splits", "train", "num_samples"], 4.0), "splits.train.num_samples: expected an integer, got 4.0"),
        (_set(["splits", "train", "num_samples"], "4"), "splits.train.num_samples: expected an integer"),
        (_set(["splits", "train", "num_classes"], True), "splits.train.num_classes: expected an integer, got true"),
        (_set(["splits", "train", "shards", 0, "num_samples"], 1.5), "splits.train.shards[0].num_samples: expected"),
        (_set(["splits", "train", "shards", 0, "num_bytes"], -1), "splits.train.shards[0].num_bytes: -1 is negative"),
        (_set(["splits", "train", "class_names"], ["cat", "cat"]), "splits.train.class_names: class 'cat' appears 2"),
        (_set(["splits", "train", "class_names"], ["cat", 3]), "splits.train.class_names[1]: a class name is a"),
        (_set(["splits", "train", "label_kind"], "many"), "splits.train.label_kind: 'many' is not one of"),
        (_set(["splits", "train", "name"], "val"), "splits.train.name: 'val', but the entry is listed as split"),
        (_set(["splits", "train", "shards"], {"a": 1}), "splits.train.shards: expected a list"),
        (_set(["splits", "train", "colour"], 1), "splits.train.colour: unknown key"),
        (_set(["splits", "train", "shards", 0, "sha256"], "abc"), 'splits.train.shards[0].sha256: "abc" is not 64'),
        (_set(["format_version"], "1"), "manifest.format_version: expected an integer"),
        (_set(["splits"], []), "manifest.splits: expected an object"),
        (_rename_split, "splits.../x: invalid split name '../x'"),
        (_point_into_val, "splits.train.shards[0].path: 'val/val-000000.tar' is not a file in split 'train'"),
    ],
)
def test_a_hand_edited_manifest_is_one_line_naming_file_and_key(converted, monkeypatch, capsys, edit, key):
    data = json.loads(manifest_path(converted).read_text())
    edit(data)
    manifest_path(converted).write_text(json.dumps(data))
    line = one_line_error(*run_main(monkeypatch, capsys, "verify", str(converted), "--workers", "1"))
    assert f"{manifest_path(converted)}: {key}" in line, line


def test_a_key_given_twice_in_the_manifest_is_refused(converted, monkeypatch, capsys):
    text = manifest_path(converted).read_text().replace('"num_classes": 2,', '"num_classes": 2, "num_classes": 3,', 1)
    manifest_path(converted).write_text(text)
    line = one_line_error(*run_main(monkeypatch, capsys, "verify", str(converted), "--workers", "1"))
    assert "key 'num_classes' appears 2 times" in line and str(manifest_path(converted)) in line, line


# --- item 9: messages that mislead --------------------------------------------------------------


@pytest.mark.parametrize("split", ["../x", "a/b", ".", "train.old", ""])
def test_a_split_name_that_is_a_path_is_called_an_invalid_split_name(tmp_path, monkeypatch, capsys, split):
    images, labels = folder_dataset(tmp_path, ["cat", "dog"])
    line = one_line_error(*run_main(monkeypatch, capsys, *folder_args(images, labels, tmp_path / "out", split)))
    assert f"invalid --split {split!r}" in line and "sample key" not in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


def test_a_write_failing_on_a_read_only_file_system_says_read_only(tmp_path, monkeypatch, capsys):
    images, labels = folder_dataset(tmp_path, ["cat", "dog"])
    out = tmp_path / "out"
    real_fsync, real_statvfs = os.fsync, os.statvfs

    def fsync(fd):  # some file systems mounted read-only answer a write with ENOSPC
        if "manifest.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    def statvfs(path):
        result = real_statvfs(path)
        if Path(path) == out:
            return os.statvfs_result((*result[:8], result.f_flag | os.ST_RDONLY, result.f_namemax))
        return result

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "statvfs", statvfs)
    line = one_line_error(*run_main(monkeypatch, capsys, *folder_args(images, labels, out)))
    assert "read-only" in line and "free space" not in line and str(manifest_path(out)) in line, line


def test_a_killed_runs_temporary_files_are_cleaned_by_the_next_run(tmp_path, monkeypatch, capsys):
    images, labels = folder_dataset(tmp_path, ["cat", "dog"])
    out = tmp_path / "out"
    leftovers = [
        out / "train" / f"..progress.json.{os.getpid() + 1}-0a1b2c3d.tmp",
        out / ".manifest.json.7-deadbeef.tmp",
    ]
    for path in leftovers:
        write(path, b"{")
    mine = write(out / "train" / "notes.progress.json.tmp", b"mine")  # not a name the converter makes
    status, output = run_main(monkeypatch, capsys, *folder_args(images, labels, out))
    assert status == 0, output
    assert not any(path.exists() for path in leftovers) and mine.read_bytes() == b"mine"


def test_converting_into_a_folder_with_a_damaged_manifest_names_it(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    write(manifest_path(out), b'{"format_version": 1, "splits": {')  # a torn manifest
    line = one_line_error(*run_main(monkeypatch, capsys, *grid_args(out)))
    assert f"{manifest_path(out)} is not a valid manifest" in line, line
    assert manifest_path(out).read_bytes() == b'{"format_version": 1, "splits": {'


# --- the same through a real process (tools/make_shards.py) -------------------------------------


def test_in_a_real_process_each_fault_is_one_line_and_no_traceback(tmp_path):
    """What a user sees: ``python tools/make_shards.py ...`` exits 2 with one line on stderr."""
    images, labels = folder_dataset(tmp_path, ["cat", "dog"])
    big = tmp_path / "big.csv"
    big.write_text("path,label\nimg0.jpg," + "x" * 200_000 + "\n")
    grid = tmp_path / "grid"
    assert make_shards(*grid_args(grid)).returncode == 0
    cases = {
        "invalid --split '../x'": folder_args(images, labels, tmp_path / "a", "../x"),
        "big.csv:2: malformed CSV (field larger than field limit": folder_args(images, big, tmp_path / "b"),
        "of another dataset (class 0 is 'cat' in the new split 'mine', '0' in split 'train')": folder_args(
            images, labels, grid, "mine"
        ),
    }
    for message, args in cases.items():
        result = make_shards(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def make_shards(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "tools/make_shards.py", *args]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
