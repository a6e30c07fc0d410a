"""The writer: shard rolling, write-time shuffle, determinism, keys, crash safety and resume, workers."""

from __future__ import annotations

import json
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
from dataset_layouts import member_bytes

import shards.writer as writer
from shards.format import FormatError, LabelKind
from shards.manifest import (
    ShardError,
    ShardRecord,
    SplitManifest,
    check_shard,
    load_splits,
    manifest_path,
    validate_split,
)
from shards.tar_io import TarShardFile
from shards.writer import PROGRESS_NAME, SourceItem, SplitSpec, WriterSettings, write_split

CLASSES = ["a", "b", "c", "d"]
SETTINGS = WriterSettings(max_samples_per_shard=10, progress=False)


def write(root: Path, items: list[SourceItem], name: str = "train", **settings) -> SplitManifest:
    return write_split(root, SplitSpec(name, LabelKind.MULTI, CLASSES), items, replace(SETTINGS, **settings))


def shard_labels(root: Path, path: str) -> list[int]:
    """The .cls labels of one tar, in file order."""
    with tarfile.open(root / path) as tar:
        return [int(member_bytes(tar, m)) for m in tar.getmembers() if m.name.endswith(".cls")]


def file_ids(root: Path, manifest: SplitManifest) -> list[tuple[int, int]]:
    """(inode, mtime) of every shard: unchanged when a run leaves a finished shard alone."""
    return [((root / s.path).stat().st_ino, (root / s.path).stat().st_mtime_ns) for s in manifest.shards]


def test_shards_roll_at_max_samples(tmp_path, make_items):
    manifest = write(tmp_path, make_items(25, 4))
    assert [s.num_samples for s in manifest.shards] == [10, 10, 5]
    assert [s.path for s in manifest.shards] == [f"train/train-{i:06d}.tar" for i in range(3)]
    assert [s.index_path for s in manifest.shards] == [f"train/train-{i:06d}.idx" for i in range(3)]


def test_shards_roll_before_exceeding_max_bytes(tmp_path, make_items):
    max_bytes = 40_000
    manifest = write(tmp_path, make_items(30, 4), max_samples_per_shard=1000, max_bytes_per_shard=max_bytes)
    sizes = [(tmp_path / s.path).stat().st_size for s in manifest.shards]
    assert sizes == [s.num_bytes for s in manifest.shards]
    assert all(size <= max_bytes for size in sizes), sizes
    counts = [s.num_samples for s in manifest.shards]
    assert len(counts) >= 3 and min(counts[:-1]) >= 2 and max(counts) - min(counts[:-1]) <= 1, counts


@pytest.mark.parametrize("key", ["short", "k" * 120])  # 120 characters: a GNU long-name member
def test_predicted_tar_size_is_the_closed_size(tmp_path, key):
    tar = TarShardFile(tmp_path / "x.tar")
    tar.add_sample([("first.jpg", b"x" * 700)])
    members = [(f"{key}.jpg", b"y" * 5000), (f"{key}.cls", b"3")]
    predicted = tar.size_with(members)
    tar.add_sample(members)
    tar.close()
    assert (tmp_path / "x.tar").stat().st_size == predicted


def test_write_time_shuffle_mixes_classes(tmp_path, make_items):
    items = make_items(40, 4)  # class-sorted: the first 10 are all class 0
    manifest = write(tmp_path, items)
    first = shard_labels(tmp_path, manifest.shards[0].path)
    assert len(set(first)) >= 3, first
    everything = [label for s in manifest.shards for label in shard_labels(tmp_path, s.path)]
    assert sorted(everything) == sorted(item.label for item in items) and everything != sorted(everything)


def test_same_inputs_give_identical_shards_and_seed_changes_them(tmp_path, make_items):
    runs = [write(tmp_path / name, make_items(25, 4), seed=seed) for name, seed in (("x", 0), ("y", 0), ("z", 1))]
    checksums = [[s.sha256 for s in run.shards] for run in runs]
    assert checksums[0] == checksums[1] and checksums[0] != checksums[2]
    assert manifest_path(tmp_path / "x").read_text() == manifest_path(tmp_path / "y").read_text()


def test_duplicate_or_invalid_keys_are_rejected_before_writing(tmp_path, make_items):
    items = make_items(5, 4)
    with pytest.raises(ShardError, match="duplicate sample keys.*s0001"):
        write(tmp_path, items + [replace(items[1], source="again")])
    with pytest.raises(FormatError, match=r"invalid sample key 'x\.jpg'"):
        write(tmp_path, items + [replace(items[1], key="x.jpg")])
    assert not manifest_path(tmp_path).exists() and not list(tmp_path.rglob("*.tar"))


class Crash(RuntimeError):
    """Stands in for a kill signal in the middle of a conversion."""


def crash_after(monkeypatch, num_samples: int) -> None:
    """Make the writer raise when it is about to add sample ``num_samples + 1``."""
    original = writer._ShardInProgress.add
    added: list[str] = []

    def add(self, result):
        if len(added) == num_samples:
            raise Crash
        added.append(result.source)
        original(self, result)

    monkeypatch.setattr(writer._ShardInProgress, "add", add)


def test_a_crash_leaves_only_complete_listed_shards_and_no_manifest_entry(tmp_path, make_items, monkeypatch):
    crash_after(monkeypatch, 25)
    with pytest.raises(Crash):
        write(tmp_path, make_items(40, 4))
    assert not manifest_path(tmp_path).exists()
    progress = json.loads((tmp_path / "train" / PROGRESS_NAME).read_text())
    listed = [ShardRecord(**r["shard"]) for r in progress["shards"]]
    assert [s.num_samples for s in listed] == [10, 10]
    for shard in listed:
        check_shard(tmp_path, shard)  # complete, with the checksum recorded
    on_disk = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.tar"))
    assert on_disk == [s.path for s in listed]


def test_a_rerun_after_a_crash_keeps_finished_shards_and_ends_like_an_uninterrupted_run(
    tmp_path, make_items, monkeypatch
):
    crash_after(monkeypatch, 25)
    with pytest.raises(Crash):
        write(tmp_path / "resumed", make_items(40, 4))
    progress = json.loads((tmp_path / "resumed" / "train" / PROGRESS_NAME).read_text())
    kept = SplitManifest(
        "train", 20, 4, CLASSES, LabelKind.MULTI, [ShardRecord(**r["shard"]) for r in progress["shards"]]
    )
    before = file_ids(tmp_path / "resumed", kept)
    monkeypatch.undo()
    resumed = write(tmp_path / "resumed", make_items(40, 4))
    assert file_ids(tmp_path / "resumed", kept) == before
    write(tmp_path / "straight", make_items(40, 4))
    assert manifest_path(tmp_path / "resumed").read_text() == manifest_path(tmp_path / "straight").read_text()
    assert resumed.num_samples == 40 and not list((tmp_path / "resumed").rglob("*partial*"))
    assert not (tmp_path / "resumed" / "train" / PROGRESS_NAME).exists()


def test_a_crash_while_rewriting_a_split_drops_its_stale_manifest_entry(tmp_path, make_items, monkeypatch):
    write(tmp_path, make_items(12, 4), name="val")
    write(tmp_path, make_items(40, 4))
    crash_after(monkeypatch, 25)
    with pytest.raises(Crash):
        write(tmp_path, make_items(40, 4), seed=7)
    assert sorted(load_splits(tmp_path)) == ["val"]  # never lists shards being replaced
    validate_split(tmp_path, "val")


def test_a_finished_split_is_left_alone_and_other_settings_rewrite_it_cleanly(tmp_path, make_items):
    first = write(tmp_path, make_items(25, 4))
    ids = file_ids(tmp_path, first)
    assert write(tmp_path, make_items(25, 4)) == first and file_ids(tmp_path, first) == ids
    second = write(tmp_path, make_items(25, 4), max_samples_per_shard=20)
    assert [s.num_samples for s in second.shards] == [20, 5]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "train-000000.idx",
        "train-000000.tar",
        "train-000001.idx",
        "train-000001.tar",
    ]
    validate_split(tmp_path, "train")


def test_all_inputs_skipped_is_a_clear_error(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    items = [
        SourceItem(f"k{i}", 0, name, path=str(tmp_path / name)) for i, name in enumerate(["empty.jpg", "text.jpg"])
    ]
    with pytest.raises(ShardError, match="no sample could be written; all 2 inputs were skipped.*zero-byte"):
        write(tmp_path / "out", items)
    assert not manifest_path(tmp_path / "out").exists()


def test_two_worker_processes_write_the_same_shards_as_one(tmp_path, make_items):
    one = write(tmp_path / "one", make_items(40, 4), workers=1)
    two = write(tmp_path / "two", make_items(40, 4), workers=2)
    assert [s.sha256 for s in two.shards] == [s.sha256 for s in one.shards]
    assert len(one.shards) == 4
