"""The manifest: what a shard folder promises (splits, shards, counts, checksums, file reports).

``OUT/manifest.json`` holds one entry per split. Shard paths in it are relative to ``OUT``.
Every write is atomic (temporary file, fsync, rename), so a crash never leaves a manifest that
lists a shard which is not completely on disk, and every update is a read-modify-write under the
output folder's lock (``shards.folder_lock``), so two writers never lose each other's splits.
Paths in the manifest must stay inside its folder: absolute paths and ``..`` are refused on loading.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from shards.atomic_files import atomic_write_text
from shards.errors import ShardError
from shards.folder_lock import output_lock
from shards.format import (
    FIELD_IMAGE,
    FIELD_LABEL,
    FIELD_TARGETS,
    LABEL_DTYPE,
    TARGETS_DTYPE,
    FormatError,
    LabelKind,
    check_split_name,
)
from shards.manifest_checks import check_manifest_json, parse_manifest_json
from shards.tar_io import Member, read_index

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_HASH_CHUNK_BYTES = 1 << 20
_TAR_BLOCK_BYTES = 512  # member data starts on a block boundary (DALI's reader insists on it)
# A lone manifest update waits this long for a conversion's short manifest write to finish.
_MANIFEST_LOCK_WAIT_S = 30.0

__all__ = ["ShardError"]  # re-exported: ``from shards.manifest import ShardError`` is the usual import


@dataclass(frozen=True)
class ShardRecord:
    """One tar file and its DALI index, paths relative to the manifest folder."""

    path: str
    index_path: str
    num_samples: int
    num_bytes: int
    sha256: str

    def __post_init__(self) -> None:
        for name in ("path", "index_path"):
            _check_inside(getattr(self, name), name)


@dataclass(frozen=True)
class FileReport:
    """A source file that was skipped or repaired, with the reason."""

    source: str
    reason: str


@dataclass(frozen=True)
class SplitManifest:
    """Everything a reader needs to know about one split."""

    name: str
    num_samples: int
    num_classes: int
    class_names: list[str]
    label_kind: LabelKind
    shards: list[ShardRecord]
    writer: dict[str, Any] = field(default_factory=dict)
    skipped: list[FileReport] = field(default_factory=list)
    repaired: list[FileReport] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            check_split_name(self.name)  # the name is the split's folder: no separators, no '..'
        except FormatError as error:
            raise ShardError(str(error)) from None
        counted = sum(s.num_samples for s in self.shards)
        if counted != self.num_samples:
            raise ShardError(f"split {self.name}: shards hold {counted} samples, manifest says {self.num_samples}")
        if len(self.class_names) != self.num_classes:
            raise ShardError(f"split {self.name}: {len(self.class_names)} class names for {self.num_classes} classes")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["label_kind"] = self.label_kind.value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SplitManifest:
        return cls(
            name=data["name"],
            num_samples=int(data["num_samples"]),
            num_classes=int(data["num_classes"]),
            class_names=list(data["class_names"]),
            label_kind=LabelKind(data["label_kind"]),
            shards=[ShardRecord(**s) for s in data["shards"]],
            writer=dict(data.get("writer", {})),
            skipped=[FileReport(**r) for r in data.get("skipped", [])],
            repaired=[FileReport(**r) for r in data.get("repaired", [])],
            extra=dict(data.get("extra", {})),
        )


def _check_inside(path: str, what: str) -> None:
    """Refuse a manifest path that would leave the manifest's folder (a hostile or hand-edited file)."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or "\\" in path or ".." in pure.parts:
        raise ShardError(
            f"shard {what} {path!r} is absolute or leaves the dataset folder; "
            "manifest paths must be relative, without '..'"
        )


def manifest_path(root: Path) -> Path:
    return Path(root) / MANIFEST_NAME


def load_splits(root: Path) -> dict[str, SplitManifest]:
    """All splits of the manifest in ``root``; a clear error when it is missing or malformed."""
    path = manifest_path(root)
    if not path.is_file():
        raise ShardError(f"no manifest at {path}: is {root} a shard folder made by tools/make_shards.py?")
    data = read_manifest_json(path)
    try:
        return {name: SplitManifest.from_json(entry) for name, entry in data["splits"].items()}
    except ShardError as error:
        raise ShardError(f"{path}: {error}") from None


def read_manifest_json(path: Path) -> dict[str, Any]:
    """The manifest's JSON after ``manifest_checks`` (one ``ShardError`` naming the file and key)."""
    try:
        data = parse_manifest_json(path.read_text())
        check_manifest_json(data, FORMAT_VERSION)
    except ShardError as error:
        raise ShardError(f"{path}: {error}") from None
    except ValueError as error:  # not JSON (UnicodeDecodeError too)
        raise ShardError(f"{path} is not a valid manifest: {error}") from None
    return data


def load_split(root: Path, split: str) -> SplitManifest:
    splits = load_splits(root)
    if split not in splits:
        raise ShardError(f"{manifest_path(root)} has no split {split!r}; it has {sorted(splits)}")
    return splits[split]


def save_split(root: Path, split: SplitManifest) -> None:
    """Add or replace one split in ``root/manifest.json``, keeping the others (under the folder's lock)."""
    with output_lock(root, wait_s=_MANIFEST_LOCK_WAIT_S):
        path = manifest_path(root)
        data: dict[str, Any] = {"format_version": FORMAT_VERSION, "splits": {}}
        if path.is_file():
            data = read_manifest_json(path)  # a damaged manifest is named, never half-kept
        data["splits"][split.name] = split.to_json()
        data["splits"] = dict(sorted(data["splits"].items()))
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def remove_split(root: Path, name: str) -> None:
    """Drop one split from ``root/manifest.json`` (nothing to do when it is not there)."""
    with output_lock(root, wait_s=_MANIFEST_LOCK_WAIT_S):
        path = manifest_path(root)
        if not path.is_file():
            return
        data = read_manifest_json(path)
        if name in data["splits"]:
            del data["splits"][name]
            atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_shard(root: Path, shard: ShardRecord, check_hash: bool = True) -> None:
    """Raise ``ShardError`` naming the file when a shard or its index is missing or damaged."""
    tar = Path(root) / shard.path
    index = Path(root) / shard.index_path
    if not tar.is_file():
        raise ShardError(f"missing shard {tar}")
    if not index.is_file():
        raise ShardError(f"missing index file {index} (beside shard {tar})")
    size = tar.stat().st_size
    if size != shard.num_bytes:
        raise ShardError(f"shard {tar} has {size} bytes, manifest says {shard.num_bytes} (truncated or replaced?)")
    if check_hash and sha256_file(tar) != shard.sha256:
        raise ShardError(f"shard {tar} fails its sha256 checksum (corrupted?)")


def validate_split(root: Path, split: str, check_hash: bool = True, check_index: bool = False) -> SplitManifest:
    """Load one split and check every shard against the manifest: presence and size, the sha256
    with ``check_hash``, and with ``check_index`` the index files (see ``check_index_file``)."""
    manifest = load_split(root, split)
    check_shards(root, manifest, check_hash, check_index)
    return manifest


def check_shards(root: Path, manifest: SplitManifest, check_hash: bool = True, check_index: bool = False) -> None:
    """``validate_split`` of a manifest already read."""
    for shard in manifest.shards:
        check_shard(root, shard, check_hash)
        if check_index:
            check_index_file(root, shard, manifest)


def check_index_file(root: Path, shard: ShardRecord, split: SplitManifest) -> list[list[Member]]:
    """The shard's index entries, after checking what a loader relies on: as many samples as the
    manifest says, every member inside the tar and block-aligned, the fields a loader reads present
    with their fixed sizes. Raises ``ShardError`` naming the index file and the sample."""
    path = Path(root) / shard.index_path
    try:
        samples = read_index(path)
    except (OSError, ValueError) as error:
        raise ShardError(f"unreadable index file {path}: {error}") from None
    if len(samples) != shard.num_samples:
        raise ShardError(f"index file {path} lists {len(samples)} samples, manifest says {shard.num_samples}")
    sizes = _fixed_sizes(split)
    for members in samples:
        problem = _index_entry_problem(members, shard.num_bytes, sizes)
        if problem:
            name = members[0].name if members else "(empty line)"
            raise ShardError(
                f"index file {path}: sample {name}: {problem} (shard {Path(root) / shard.path}; damaged or edited?)"
            )
    return samples


def _fixed_sizes(split: SplitManifest) -> dict[str, int | None]:
    """Fields a loader reads -> their size in bytes (None: any size)."""
    sizes: dict[str, int | None] = {FIELD_IMAGE: None, FIELD_LABEL: LABEL_DTYPE.itemsize}
    if split.label_kind.has_targets:
        sizes[FIELD_TARGETS] = split.num_classes * TARGETS_DTYPE.itemsize
    return sizes


def _index_entry_problem(members: list[Member], tar_bytes: int, sizes: dict[str, int | None]) -> str | None:
    by_ext = {m.ext: m for m in members}
    missing = [ext for ext in sizes if ext not in by_ext]
    if missing:
        return f"no member {missing}"
    for m in members:
        if m.offset < 0 or m.size < 0 or m.offset + m.size > tar_bytes:
            return f"member {m.name} at bytes [{m.offset}, {m.offset + m.size}) lies outside the {tar_bytes}-byte tar"
        if m.offset % _TAR_BLOCK_BYTES:
            return f"member {m.name} offset {m.offset} is not a multiple of {_TAR_BLOCK_BYTES}"
        expected = sizes.get(m.ext)
        if expected is not None and m.size != expected:
            return f"member {m.name} holds {m.size} bytes, expected {expected}"
    return None
