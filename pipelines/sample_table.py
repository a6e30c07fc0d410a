"""Random access to a split's samples: where each sample's members lie (from the .idx files) and reading them.

The torch backend reads samples by seeking, not by streaming a tar: the per-rank split, the
per-epoch global shuffle and mid-epoch resume are then plain index arithmetic. The table is a
handful of numpy arrays (one entry per sample, in file order) so it costs little memory and is
shared copy-on-write with forked DataLoader workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.contract import ShardDataError, verify_advice
from shards.format import FIELD_IMAGE, FIELD_LABEL, FIELD_TARGETS, LABEL_DTYPE, TARGETS_DTYPE
from shards.manifest import SplitManifest, check_index_file
from shards.tar_io import read_index, split_name


@dataclass(frozen=True)
class SampleTable:
    """Member locations of every sample of a split, in file order (shard by shard).

    ``targets_offset`` is None when the split has no multi-hot targets."""

    root: str  # the shard folder (named in error messages)
    shard_paths: tuple[str, ...]  # absolute tar paths, indexed by ``shard``
    index_paths: tuple[str, ...]  # their index files (sample keys are read from them only for errors)
    shard: np.ndarray  # int32 per sample
    image_offset: np.ndarray  # int64 byte offset of KEY.jpg data
    image_size: np.ndarray  # int64 byte length of KEY.jpg
    label_offset: np.ndarray  # int64 byte offset of KEY.lbl (4 bytes int32 LE)
    targets_offset: np.ndarray | None  # int64 byte offset of KEY.tgt (num_classes bytes)
    num_classes: int
    label_range: tuple[int, int]  # [low, high) of the KEY.lbl values (LabelKind.label_range)

    def __len__(self) -> int:
        return len(self.shard)

    def sample_name(self, index: int) -> str:
        """``shard PATH, sample KEY (#i in the shard)`` for error messages."""
        shard = int(self.shard[index])
        position = index - int(np.searchsorted(self.shard, shard, side="left"))  # samples are in shard order
        try:
            key = split_name(read_index(Path(self.index_paths[shard]))[position][0].name)[0]
        except (OSError, ValueError, IndexError):
            key = "?"
        return f"shard {self.shard_paths[shard]}, sample {key} (#{position} in the shard)"


def build_sample_table(root: Path, manifest: SplitManifest) -> SampleTable:
    """Read every index file of ``manifest`` into a ``SampleTable``, checked by ``check_index_file``
    (counts, members inside the tar, field sizes): errors name the index file and sample."""
    has_targets = manifest.label_kind.has_targets
    columns: dict[str, list[int]] = {
        "shard": [],
        "image_offset": [],
        "image_size": [],
        "label_offset": [],
        "targets_offset": [],
    }
    for shard_no, record in enumerate(manifest.shards):
        for members in check_index_file(root, record, manifest):
            by_ext = {m.ext: m for m in members}
            columns["shard"].append(shard_no)
            columns["image_offset"].append(by_ext[FIELD_IMAGE].offset)
            columns["image_size"].append(by_ext[FIELD_IMAGE].size)
            columns["label_offset"].append(by_ext[FIELD_LABEL].offset)
            columns["targets_offset"].append(by_ext[FIELD_TARGETS].offset if has_targets else -1)
    return SampleTable(
        root=str(root),
        shard_paths=tuple(str(Path(root) / r.path) for r in manifest.shards),
        index_paths=tuple(str(Path(root) / r.index_path) for r in manifest.shards),
        shard=np.asarray(columns["shard"], dtype=np.int32),
        image_offset=np.asarray(columns["image_offset"], dtype=np.int64),
        image_size=np.asarray(columns["image_size"], dtype=np.int64),
        label_offset=np.asarray(columns["label_offset"], dtype=np.int64),
        targets_offset=np.asarray(columns["targets_offset"], dtype=np.int64) if has_targets else None,
        num_classes=manifest.num_classes,
        label_range=manifest.label_kind.label_range(manifest.num_classes),
    )


class ShardReader:
    """Reads member bytes with ``os.pread``, keeping one open descriptor per shard and process.

    Descriptors are reopened after a fork (the pid changes) so DataLoader workers never share
    one with the parent; ``pread`` has no file position, so no seek state exists to get wrong."""

    def __init__(self, table: SampleTable) -> None:
        self.table = table
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def read(self, index: int, offset: int, size: int) -> bytearray:
        """``size`` bytes at ``offset`` in sample ``index``'s shard, in a writable buffer
        (torch.frombuffer needs one, without a copy); ``ShardDataError`` when they cannot be read."""
        data = bytearray(size)
        self.read_into(index, data, offset)
        return data

    def read_into(self, index: int, buffer: bytearray | memoryview, offset: int) -> None:
        """Fill ``buffer`` (writable, contiguous) with the bytes at ``offset`` in sample ``index``'s
        shard; ``ShardDataError`` when they cannot be read."""
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        shard = int(self.table.shard[index])
        size = len(buffer)
        try:
            fd = self._fds.get(shard)
            if fd is None:
                fd = self._fds[shard] = os.open(self.table.shard_paths[shard], os.O_RDONLY)
            got = os.preadv(fd, [buffer], offset)
        except OSError as error:
            raise self.data_error(index, f"read failed ({error.strerror or error})") from None
        if got != size:
            raise self.data_error(index, f"short read at byte {offset} (truncated?)")

    def data_error(self, index: int, problem: str) -> ShardDataError:
        return ShardDataError(f"{self.table.sample_name(index)}: {problem}; {verify_advice(self.table.root)}")

    def image_bytes(self, index: int) -> bytearray:
        t = self.table
        return self.read(index, int(t.image_offset[index]), int(t.image_size[index]))

    def label(self, index: int) -> int:
        data = self.read(index, int(self.table.label_offset[index]), LABEL_DTYPE.itemsize)
        label = int(np.frombuffer(data, dtype=LABEL_DTYPE)[0])
        low, high = self.table.label_range
        if not low <= label < high:
            raise self.data_error(index, f"label {label} outside [{low}, {high})")
        return label

    def targets(self, index: int) -> np.ndarray:
        t = self.table
        assert t.targets_offset is not None, "split has no targets"
        data = self.read(index, int(t.targets_offset[index]), t.num_classes * TARGETS_DTYPE.itemsize)
        return np.frombuffer(data, dtype=TARGETS_DTYPE)

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:
        # Descriptors do not travel to spawned workers; each process opens its own.
        return {"table": self.table, "_fds": {}, "_pid": -1}
