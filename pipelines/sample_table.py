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

from shards.format import FIELD_IMAGE, FIELD_LABEL, FIELD_TARGETS, LABEL_DTYPE, TARGETS_DTYPE
from shards.manifest import ShardError, SplitManifest
from shards.tar_io import Member, read_index


@dataclass(frozen=True)
class SampleTable:
    """Member locations of every sample of a split, in file order (shard by shard).

    ``targets_offset`` is None when the split has no multi-hot targets."""

    shard_paths: tuple[str, ...]  # absolute tar paths, indexed by ``shard``
    shard: np.ndarray  # int32 per sample
    image_offset: np.ndarray  # int64 byte offset of KEY.jpg data
    image_size: np.ndarray  # int64 byte length of KEY.jpg
    label_offset: np.ndarray  # int64 byte offset of KEY.lbl (4 bytes int32 LE)
    targets_offset: np.ndarray | None  # int64 byte offset of KEY.tgt (num_classes bytes)
    num_classes: int

    def __len__(self) -> int:
        return len(self.shard)


def build_sample_table(root: Path, manifest: SplitManifest) -> SampleTable:
    """Read every index file of ``manifest`` into a ``SampleTable``; errors name the file at fault."""
    has_targets = manifest.label_kind.has_targets
    columns: dict[str, list[int]] = {"shard": [], "image_offset": [], "image_size": [], "label_offset": [], "targets_offset": []}
    for shard_no, record in enumerate(manifest.shards):
        index_path = Path(root) / record.index_path
        samples = read_index(index_path)
        if len(samples) != record.num_samples:
            raise ShardError(f"index file {index_path} lists {len(samples)} samples, manifest says {record.num_samples}")
        for members in samples:
            by_ext = _members_by_ext(members, index_path, has_targets)
            columns["shard"].append(shard_no)
            columns["image_offset"].append(by_ext[FIELD_IMAGE].offset)
            columns["image_size"].append(by_ext[FIELD_IMAGE].size)
            columns["label_offset"].append(by_ext[FIELD_LABEL].offset)
            columns["targets_offset"].append(by_ext[FIELD_TARGETS].offset if has_targets else -1)
    return SampleTable(
        shard_paths=tuple(str(Path(root) / r.path) for r in manifest.shards),
        shard=np.asarray(columns["shard"], dtype=np.int32),
        image_offset=np.asarray(columns["image_offset"], dtype=np.int64),
        image_size=np.asarray(columns["image_size"], dtype=np.int64),
        label_offset=np.asarray(columns["label_offset"], dtype=np.int64),
        targets_offset=np.asarray(columns["targets_offset"], dtype=np.int64) if has_targets else None,
        num_classes=manifest.num_classes,
    )


def _members_by_ext(members: list[Member], index_path: Path, has_targets: bool) -> dict[str, Member]:
    by_ext = {m.ext: m for m in members}
    needed = (FIELD_IMAGE, FIELD_LABEL) + ((FIELD_TARGETS,) if has_targets else ())
    missing = [ext for ext in needed if ext not in by_ext]
    if missing:
        raise ShardError(f"index file {index_path}: sample {members[0].name if members else '?'} lacks members {missing}")
    return by_ext


class ShardReader:
    """Reads member bytes with ``os.pread``, keeping one open descriptor per shard and process.

    Descriptors are reopened after a fork (the pid changes) so DataLoader workers never share
    one with the parent; ``pread`` has no file position, so no seek state exists to get wrong."""

    def __init__(self, table: SampleTable) -> None:
        self.table = table
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def read(self, shard: int, offset: int, size: int) -> bytearray:
        """``size`` bytes at ``offset``, in a writable buffer (torch.frombuffer needs one, without a copy)."""
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.table.shard_paths[shard], os.O_RDONLY)
        data = bytearray(size)
        if os.preadv(fd, [data], offset) != size:
            raise ShardError(f"shard {self.table.shard_paths[shard]}: short read at byte {offset} (truncated?)")
        return data

    def image_bytes(self, index: int) -> bytearray:
        t = self.table
        return self.read(int(t.shard[index]), int(t.image_offset[index]), int(t.image_size[index]))

    def label(self, index: int) -> int:
        data = self.read(int(self.table.shard[index]), int(self.table.label_offset[index]), LABEL_DTYPE.itemsize)
        return int(np.frombuffer(data, dtype=LABEL_DTYPE)[0])

    def targets(self, index: int) -> np.ndarray:
        t = self.table
        assert t.targets_offset is not None, "split has no targets"
        data = self.read(int(t.shard[index]), int(t.targets_offset[index]), t.num_classes * TARGETS_DTYPE.itemsize)
        return np.frombuffer(data, dtype=TARGETS_DTYPE)

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:
        # Descriptors do not travel to spawned workers; each process opens its own.
        return {"table": self.table, "_fds": {}, "_pid": -1}
