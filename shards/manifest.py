"""The manifest: what a shard folder promises (splits, shards, counts, checksums, file reports).

``OUT/manifest.json`` holds one entry per split. Shard paths in it are relative to ``OUT``.
Every write is atomic (temporary file, fsync, rename), so a crash never leaves a manifest that
lists a shard which is not completely on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shards.format import LabelKind

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_HASH_CHUNK_BYTES = 1 << 20


class ShardError(Exception):
    """A shard folder that does not match its manifest; the message names the file at fault."""


@dataclass(frozen=True)
class ShardRecord:
    """One tar file and its DALI index, paths relative to the manifest folder."""

    path: str
    index_path: str
    num_samples: int
    num_bytes: int
    sha256: str


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
    def from_json(cls, data: dict[str, Any]) -> "SplitManifest":
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


def manifest_path(root: Path) -> Path:
    return Path(root) / MANIFEST_NAME


def load_splits(root: Path) -> dict[str, SplitManifest]:
    """All splits of the manifest in ``root``; a clear error when it is missing or malformed."""
    path = manifest_path(root)
    if not path.is_file():
        raise ShardError(f"no manifest at {path}: is {root} a shard folder made by tools/make_shards.py?")
    try:
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise ShardError(f"{path}: format_version {data.get('format_version')}, expected {FORMAT_VERSION}")
        return {name: SplitManifest.from_json(entry) for name, entry in data["splits"].items()}
    except ShardError:
        raise
    except (ValueError, KeyError, TypeError) as error:
        raise ShardError(f"{path} is not a valid manifest: {error}") from None


def load_split(root: Path, split: str) -> SplitManifest:
    splits = load_splits(root)
    if split not in splits:
        raise ShardError(f"{manifest_path(root)} has no split {split!r}; it has {sorted(splits)}")
    return splits[split]


def save_split(root: Path, split: SplitManifest) -> None:
    """Add or replace one split in ``root/manifest.json``, keeping the others."""
    path = manifest_path(root)
    data: dict[str, Any] = {"format_version": FORMAT_VERSION, "splits": {}}
    if path.is_file():
        data = json.loads(path.read_text())
    data["splits"][split.name] = split.to_json()
    data["splits"] = dict(sorted(data["splits"].items()))
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def remove_split(root: Path, name: str) -> None:
    """Drop one split from ``root/manifest.json`` (nothing to do when it is not there)."""
    path = manifest_path(root)
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    if name in data.get("splits", {}):
        del data["splits"][name]
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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


def validate_split(root: Path, split: str, check_hash: bool = True) -> SplitManifest:
    """Load one split and check every shard against the manifest."""
    manifest = load_split(root, split)
    for shard in manifest.shards:
        check_shard(root, shard, check_hash)
    return manifest
