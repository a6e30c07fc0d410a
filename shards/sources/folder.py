"""Generic source: an image folder plus a CSV or JSONL label file (``path,label[,labels]``).

Paths are relative to the image folder. ``label`` is a class name or integer; ``labels`` (optional)
is the multi-label set, names separated by ``;`` or spaces in CSV, a list in JSONL. Classes are the
sorted names found (integers keep their value), or those of a split already in the output
manifest, so every split of one dataset shares one class index.

An unlabelled split (``unlabelled=True``, ``make-shards folder --unlabelled``) needs only the
``path`` column; any label columns are not read. Its samples carry ``NO_LABEL`` and label kind
``unlabelled``, and it takes its class names from a labelled split already in the manifest
(the classes a teacher's pseudo-labels index), so that split must be converted first.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from shards.format import NO_LABEL, LabelKind, safe_key
from shards.manifest import ShardError, load_splits, manifest_path
from shards.sources.common import PathGuard, SourceError, read_text
from shards.writer import SourceItem, SplitSpec


class LabelFileError(ShardError):
    """A label file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Row:
    line: int
    path: str
    label: str
    label_set: tuple[str, ...] | None  # the CSV/JSONL "labels" column


def read_rows(labels_file: Path, unlabelled: bool = False) -> list[Row]:
    """Parse a CSV (with a header row) or JSONL label file; ``unlabelled``: only paths are read
    (each row's label is "" and its label set None)."""
    if not labels_file.is_file():
        raise LabelFileError(f"label file {labels_file} does not exist")
    try:
        text = read_text(labels_file, "label file")
    except SourceError as error:
        raise LabelFileError(str(error)) from None
    if labels_file.suffix.lower() in (".jsonl", ".ndjson"):
        rows = _read_jsonl(labels_file, text, unlabelled)
    else:
        rows = _read_csv(labels_file, text, unlabelled)
    if not rows:
        raise LabelFileError(f"{labels_file}: no rows")
    return rows


def _read_csv(path: Path, text: str, unlabelled: bool) -> list[Row]:
    # read_text drops the byte-order mark spreadsheet programs put before a "CSV UTF-8" header
    with io.StringIO(text, newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        for column in ("path",) if unlabelled else ("path", "label"):
            if column not in header:
                raise LabelFileError(
                    f"{path}:1: header {header} has no {column!r} column (expected path,label[,labels])"
                )
        rows = []
        for record in reader:
            line = reader.line_num
            if unlabelled:
                rows.append(Row(line, _field(path, line, record, "path"), "", None))
                continue
            labels = record.get("labels")
            split_labels = tuple(labels.replace(";", " ").split()) if labels and labels.strip() else None
            rows.append(
                Row(line, _field(path, line, record, "path"), _field(path, line, record, "label"), split_labels)
            )
    return rows


def _read_jsonl(path: Path, content: str, unlabelled: bool) -> list[Row]:
    rows = []
    for line, text in enumerate(content.splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise LabelFileError(f"{path}:{line}: not JSON ({error})") from None
        if not isinstance(record, dict):
            raise LabelFileError(f"{path}:{line}: expected a JSON object with path and label, got {text[:60]!r}")
        if unlabelled:
            rows.append(Row(line, _field(path, line, record, "path"), "", None))
            continue
        labels = _jsonl_labels(path, line, record.get("labels"))
        rows.append(Row(line, _field(path, line, record, "path"), _field(path, line, record, "label"), labels))
    return rows


def _jsonl_labels(path: Path, line: int, labels: object) -> tuple[str, ...] | None:
    """A JSONL multi-label set: a list, or a string separated like the CSV column."""
    if labels is None:
        return None
    if isinstance(labels, str):
        return tuple(labels.replace(";", " ").split()) or None
    if not isinstance(labels, list):
        raise LabelFileError(f"{path}:{line}: 'labels' must be a list of classes, got {labels!r}")
    return tuple(str(x) for x in labels)


def _field(path: Path, line: int, record: dict, name: str) -> str:
    value = record.get(name)
    if value is None or str(value).strip() == "":
        raise LabelFileError(f"{path}:{line}: missing {name!r}")
    return str(value).strip()


def class_names_for(rows: list[Row], out: Path, split: str | None = None) -> list[str]:
    """Reuse the classes of another split in ``out``, else sorted names (integer labels keep their value).

    The split being (re)written does not count: re-running it after fixing a class name in the
    label file must not bring the old classes back.
    """
    if manifest_path(out).is_file():
        others = [s for name, s in load_splits(out).items() if name != split]
        if others:
            return others[0].class_names
    names = {row.label for row in rows} | {name for row in rows for name in (row.label_set or ())}
    if all(name.lstrip("-").isdigit() for name in names):
        values = sorted(int(name) for name in names)
        if values[0] < 0:
            raise LabelFileError(f"negative class index {values[0]} in the label file")
        return [str(i) for i in range(values[-1] + 1)]
    return sorted(names)


def folder_items(
    images: Path,
    labels_file: Path,
    out: Path,
    split: str | None = None,
    follow_symlinks: bool = False,
    unlabelled: bool = False,
) -> tuple[list[SourceItem], list[str], LabelKind]:
    """Items, class names and label kind of ``split``; every structural problem is an error naming
    the line, a path leaving ``images`` included (see ``PathGuard``). ``unlabelled``: the label
    file's paths only, as an unlabelled split (see the module docstring)."""
    if not images.is_dir():
        raise ShardError(f"image folder {images} does not exist")
    guard = PathGuard(images, follow_symlinks)
    rows = read_rows(labels_file, unlabelled)
    class_names = unlabelled_class_names(out, split) if unlabelled else class_names_for(rows, out, split)
    index = {name: i for i, name in enumerate(class_names)}
    if unlabelled:
        kind = LabelKind.UNLABELLED
    else:
        kind = LabelKind.MULTI if any(row.label_set is not None for row in rows) else LabelKind.SINGLE
    items = [_item(guard, row, f"{labels_file}:{row.line}", images, index, unlabelled) for row in rows]
    _check_unique_keys(items, rows, labels_file)
    return items, class_names, kind


def _item(guard: PathGuard, row: Row, where: str, images: Path, index: dict[str, int], unlabelled: bool) -> SourceItem:
    file = Path(guard.path(row.path, where))
    if not file.is_file():
        raise LabelFileError(f"{where}: image {row.path!r} not found under {images}")
    if unlabelled:
        return SourceItem(key=safe_key(row.path), label=NO_LABEL, source=row.path, path=str(file))
    for name in (row.label, *(row.label_set or ())):
        if name not in index:
            raise LabelFileError(f"{where}: class {name!r} is not among the dataset's {len(index)} classes")
    label_set = tuple(sorted({index[n] for n in row.label_set})) if row.label_set is not None else ()
    return SourceItem(
        key=safe_key(row.path), label=index[row.label], source=row.path, path=str(file), label_set=label_set
    )


def unlabelled_class_names(out: Path, split: str | None) -> list[str]:
    """The classes of a labelled split already in ``out``: an unlabelled split has none of its own."""
    labelled = []
    if manifest_path(out).is_file():
        labelled = [
            s for name, s in load_splits(out).items() if name != split and s.label_kind is not LabelKind.UNLABELLED
        ]
    if not labelled:
        raise ShardError(
            f"--unlabelled: {out} holds no labelled split yet; convert the labelled split first "
            f"(the unlabelled split takes its class names, which the teacher's pseudo-labels index)"
        )
    return labelled[0].class_names


def _check_unique_keys(items: list[SourceItem], rows: list[Row], labels_file: Path) -> None:
    """A path listed twice, or two paths that make one key (``a/b.jpg``, ``a_b.jpg``), names both lines."""
    first_line: dict[str, int] = {}
    for item, row in zip(items, rows):
        if item.key in first_line:
            raise LabelFileError(
                f"{labels_file}:{row.line}: {row.path!r} gives the same sample key {item.key!r} as line "
                f"{first_line[item.key]}; list each image once"
            )
        first_line[item.key] = row.line


def folder_spec(split: str, class_names: list[str], kind: LabelKind, labels_file: Path) -> SplitSpec:
    return SplitSpec(
        name=split,
        label_kind=kind,
        class_names=class_names,
        extra={"source": "folder", "labels_file": labels_file.name},
    )
