"""Checking ``manifest.json`` as read back from disk, with the rules a flag gets (docs/DATASETS.md,
"Checking a shard folder"): every key known and of its type, counts non-negative integers (never a
float, a string or a boolean), split names plain folder names matching their entry, class names
unique strings, shard paths inside their own split's folder. A problem is one ``ShardError`` naming
the key (``splits.train.shards[3].num_bytes: ...``); ``load_splits`` adds the file.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import PurePosixPath
from typing import Any

from shards.errors import ShardError
from shards.format import FormatError, LabelKind, check_split_name

_TOP_KEYS: dict[str, type] = {"format_version": int, "splits": dict}
_SPLIT_KEYS: dict[str, type] = {
    "name": str,
    "num_samples": int,
    "num_classes": int,
    "class_names": list,
    "label_kind": str,
    "shards": list,
    "writer": dict,
    "skipped": list,
    "repaired": list,
    "extra": dict,
}
_SPLIT_REQUIRED = ("name", "num_samples", "num_classes", "class_names", "label_kind", "shards")
_SHARD_KEYS: dict[str, type] = {"path": str, "index_path": str, "num_samples": int, "num_bytes": int, "sha256": str}
_REPORT_KEYS: dict[str, type] = {"source": str, "reason": str}
_TYPE_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def parse_manifest_json(text: str) -> dict[str, Any]:
    """The manifest's JSON, refusing a key given twice (the last would silently win)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    counts = Counter(key for key, _ in pairs)
    repeated = [key for key, n in counts.items() if n > 1]
    if repeated:
        raise ShardError(f"key {repeated[0]!r} appears {counts[repeated[0]]} times in one object")
    return dict(pairs)


def check_manifest_json(data: object, format_version: int) -> None:
    """Raise ``ShardError`` naming the first key of ``data`` that is not as the writer writes it."""
    check_fields(data, _TOP_KEYS, tuple(_TOP_KEYS), "manifest")
    assert isinstance(data, dict)
    if data["format_version"] != format_version:
        raise ShardError(f"format_version: {data['format_version']}, expected {format_version}")
    for name, entry in data["splits"].items():
        check_split_json(name, entry)


def check_split_json(name: str, entry: object) -> None:
    where = f"splits.{name}"
    try:
        check_split_name(name, "split name")
    except FormatError as error:
        raise ShardError(f"{where}: {error}") from None
    check_fields(entry, _SPLIT_KEYS, _SPLIT_REQUIRED, where)
    assert isinstance(entry, dict)
    try:
        check_split_name(entry["name"], "split name")
    except FormatError as error:
        raise ShardError(f"{where}.name: {error}") from None
    if entry["name"] != name:
        raise ShardError(f"{where}.name: {entry['name']!r}, but the entry is listed as split {name!r}")
    _check_class_names(entry["class_names"], f"{where}.class_names")
    if entry["label_kind"] not in {kind.value for kind in LabelKind}:
        kinds = ", ".join(kind.value for kind in LabelKind)
        raise ShardError(f"{where}.label_kind: {entry['label_kind']!r} is not one of {kinds}")
    _check_shards(name, entry["shards"], f"{where}.shards")
    for key in ("skipped", "repaired"):
        for number, report in enumerate(entry.get(key, [])):
            check_fields(report, _REPORT_KEYS, tuple(_REPORT_KEYS), f"{where}.{key}[{number}]")


def _check_class_names(names: list, where: str) -> None:
    for number, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise ShardError(f"{where}[{number}]: a class name is a non-empty string, got {_show(name)}")
    repeated = [name for name, n in Counter(names).items() if n > 1]
    if repeated:
        raise ShardError(f"{where}: class {repeated[0]!r} appears {names.count(repeated[0])} times")


def _check_shards(split: str, shards: list, where: str) -> None:
    seen: set[str] = set()
    for number, shard in enumerate(shards):
        here = f"{where}[{number}]"
        check_fields(shard, _SHARD_KEYS, tuple(_SHARD_KEYS), here)
        for key in ("path", "index_path"):
            pure = PurePosixPath(shard[key])
            if pure.is_absolute() or "\\" in shard[key] or ".." in pure.parts:
                raise ShardError(
                    f"{here}.{key}: shard {key} {shard[key]!r} is absolute or leaves the dataset folder; "
                    "manifest paths must be relative, without '..'"
                )
            parts = pure.parts
            if len(parts) != 2 or parts[0] != split:
                raise ShardError(f"{here}.{key}: {shard[key]!r} is not a file in split {split!r}'s folder {split}/")
            if shard[key] in seen:
                raise ShardError(f"{here}.{key}: {shard[key]!r} is listed twice")
            seen.add(shard[key])
        if not _SHA256.fullmatch(shard["sha256"]):
            raise ShardError(f"{here}.sha256: {_show(shard['sha256'])} is not 64 lowercase hex digits")


def check_fields(data: object, types: dict[str, type], required: tuple[str, ...], where: str) -> None:
    """``data`` is an object with only ``types``' keys, ``required`` among them, each of its type;
    integers are never booleans or negative."""
    if not isinstance(data, dict):
        raise ShardError(f"{where}: expected an object, got {_show(data)}")
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ShardError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(types)})")
    missing = [key for key in required if key not in data]
    if missing:
        raise ShardError(f"{where}.{missing[0]}: missing")
    for key, value in data.items():
        expected = types[key]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise ShardError(f"{where}.{key}: expected {_TYPE_NAMES[expected]}, got {_show(value)}")
        if isinstance(value, int) and value < 0:
            raise ShardError(f"{where}.{key}: {value} is negative")


def _show(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
