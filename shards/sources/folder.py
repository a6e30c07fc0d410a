"""Generic source: an image folder plus a CSV or JSONL label file (``path,label[,labels]`` or ``path,labels``).

Paths are relative to the image folder. ``label`` is the given (single) label, a class name or
integer; ``labels`` (optional) is the multi-label set, names separated by ``;`` or spaces in CSV, a
list in JSONL. A file may give ``labels`` alone (a CSV without a ``label`` column, a JSONL record
without a ``label`` key): the given label is then the first class listed in ``labels``, which must
not be empty. Classes are the
sorted names found (integers keep their value), or those of a split already in the output
manifest, so every split of one dataset shares one class index.

Label files are parsed strictly (docs/DATASETS.md, "Your own images"): a CSV needs a header naming
only ``path``, ``label`` and ``labels``, once each, and every row exactly as many fields as the
header; unbalanced quotes, fields spanning lines and over-long fields are errors naming file:line,
and so are JSONL keys other than those three, repeated keys, a ``path`` that is not a string and
labels that are not strings or integers. A non-empty ``labels`` set must contain the row's own
``label``; an empty one means the image has no multi-label set (the multi-label metrics leave it
out, as ReaL's empty sets). When every label is an integer, ``007`` and ``7`` are class 7.

An unlabelled split (``unlabelled=True``, ``make-shards folder --unlabelled``) needs only the
``path`` column; any label columns are not read. Its samples carry ``NO_LABEL`` and label kind
``unlabelled``, and it takes its class names from a labelled split already in the manifest
(the classes a teacher's pseudo-labels index), so that split must be converted first.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from shards.format import NO_LABEL, LabelKind, safe_key
from shards.manifest import ShardError, load_splits, manifest_path
from shards.sources.common import PathGuard, SourceError, read_text
from shards.writer import SourceItem, SplitSpec

COLUMNS = ("path", "label", "labels")  # every column (CSV) or key (JSONL) a label file may hold
_LAYOUT = "expected path,label[,labels] or path,labels"
_INTEGER = re.compile(r"-?[0-9]+")


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
    # read_text drops the byte-order mark spreadsheet programs put before a "CSV UTF-8" header.
    # strict: a stray quote is an error instead of a field that silently swallows the next lines.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[Row] = []
    try:
        header = _csv_header(path, next(reader, []), unlabelled)
        for fields in reader:
            if fields:  # a blank line
                rows.append(_csv_row(path, reader.line_num, header, fields, unlabelled))
    except csv.Error as error:  # bad quoting, a field over csv.field_size_limit()
        raise LabelFileError(
            f"{path}:{reader.line_num}: malformed CSV ({error}); quote a field holding ',' or '\"' as \"...\""
        ) from None
    return rows


def _csv_header(path: Path, fields: list[str], unlabelled: bool) -> list[str]:
    header = [name.strip() for name in fields]
    for name in header:
        if name and header.count(name) > 1:
            raise LabelFileError(f"{path}:1: column {name!r} appears {header.count(name)} times in the header")
    if "path" not in header:
        raise LabelFileError(f"{path}:1: header {header} has no 'path' column ({_LAYOUT})")
    if not unlabelled and "label" not in header and "labels" not in header:
        raise LabelFileError(f"{path}:1: header {header} has neither a 'label' nor a 'labels' column ({_LAYOUT})")
    for name in header:
        if name not in COLUMNS:
            what = "an unnamed column (a trailing comma?)" if not name else f"unknown column {name!r}"
            raise LabelFileError(f"{path}:1: {what} in header {header} ({_LAYOUT})")
    return header


def _csv_row(path: Path, line: int, header: list[str], fields: list[str], unlabelled: bool) -> Row:
    if len(fields) != len(header):
        raise LabelFileError(
            f"{path}:{line}: {len(fields)} fields, the header has {len(header)} ({','.join(header)}); "
            "quote a field that holds a comma"
        )
    if any("\n" in f or "\r" in f for f in fields):
        raise LabelFileError(f"{path}:{line}: a field spans several lines (an unbalanced quote?)")
    record = dict(zip(header, fields))
    if unlabelled:
        return Row(line, _field(path, line, record, "path"), "", None)
    labels = record.get("labels")
    split_labels = tuple(labels.replace(";", " ").split()) if labels and labels.strip() else None
    if "label" not in record:
        return Row(line, _field(path, line, record, "path"), _first_listed(path, line, split_labels), split_labels)
    return Row(line, _field(path, line, record, "path"), _field(path, line, record, "label"), split_labels)


def _first_listed(path: Path, line: int, labels: tuple[str, ...] | None) -> str:
    """The given label of a row without one: the first class its ``labels`` set lists."""
    if not labels:
        raise LabelFileError(
            f"{path}:{line}: missing 'label': give one, or a non-empty 'labels' set (its first class is then the label)"
        )
    return labels[0]


class _RepeatedKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json.loads`` hook: a key given twice is an error, not the last value silently winning."""
    record: dict[str, object] = {}
    for key, value in pairs:
        if key in record:
            raise _RepeatedKey(key)
        record[key] = value
    return record


def _read_jsonl(path: Path, content: str, unlabelled: bool) -> list[Row]:
    rows = []
    for line, text in enumerate(content.splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text, object_pairs_hook=_unique_keys)
        except _RepeatedKey as error:
            raise LabelFileError(f"{path}:{line}: key {str(error)!r} appears more than once") from None
        except (json.JSONDecodeError, RecursionError) as error:
            raise LabelFileError(f"{path}:{line}: not JSON ({error})") from None
        if not isinstance(record, dict):
            raise LabelFileError(f"{path}:{line}: expected a JSON object with path and label, got {text[:60]!r}")
        unknown = sorted(set(record) - set(COLUMNS))
        if unknown:
            raise LabelFileError(f"{path}:{line}: unknown key {unknown[0]!r} ({_LAYOUT})")
        if unlabelled:
            rows.append(Row(line, _json_string(path, line, record, "path"), "", None))
            continue
        labels = _jsonl_labels(path, line, record.get("labels"))
        if "label" in record:
            label = _json_label(path, line, record.get("label"), "label")
        else:
            label = _first_listed(path, line, labels)
        rows.append(Row(line, _json_string(path, line, record, "path"), label, labels))
    return rows


def _json_string(path: Path, line: int, record: dict, name: str) -> str:
    value = record.get(name)
    if value is not None and not isinstance(value, str):
        raise LabelFileError(f"{path}:{line}: {name!r} must be a string, got {json.dumps(value)[:60]}")
    return _field(path, line, record, name)


def _json_label(path: Path, line: int, value: object, what: str) -> str:
    """A class given as a string or an integer (never a float, bool, list or object)."""
    if value is None:
        raise LabelFileError(f"{path}:{line}: missing {what!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise LabelFileError(
            f"{path}:{line}: {what!r} must be a class name (string) or index (integer), got {json.dumps(value)[:60]}"
        )
    if not str(value).strip():
        raise LabelFileError(f"{path}:{line}: missing {what!r}")
    return str(value).strip()


def _jsonl_labels(path: Path, line: int, labels: object) -> tuple[str, ...] | None:
    """A JSONL multi-label set: a list, or a string separated like the CSV column."""
    if labels is None:
        return None
    if isinstance(labels, str):
        return tuple(labels.replace(";", " ").split()) or None
    if not isinstance(labels, list):
        raise LabelFileError(f"{path}:{line}: 'labels' must be a list of classes, got {json.dumps(labels)[:60]}")
    return tuple(_json_label(path, line, x, "labels") for x in labels) or None


def _field(path: Path, line: int, record: dict, name: str) -> str:
    value = record.get(name)
    if value is None or str(value).strip() == "":
        raise LabelFileError(f"{path}:{line}: missing {name!r}")
    return str(value).strip()


def _is_integer(name: str) -> bool:
    return _INTEGER.fullmatch(name) is not None


def canonical_rows(rows: list[Row]) -> list[Row]:
    """When every label is an integer, each written as its value (``007`` -> ``7``): one class,
    however it is padded."""
    names = {row.label for row in rows} | {name for row in rows for name in (row.label_set or ())}
    if not all(_is_integer(name) for name in names):
        return rows
    return [
        replace(
            row,
            label=str(int(row.label)),
            label_set=None if row.label_set is None else tuple(str(int(n)) for n in row.label_set),
        )
        for row in rows
    ]


def class_names_for(rows: list[Row], out: Path, split: str | None, labels_file: Path) -> list[str]:
    """Reuse the classes of another ``folder`` split in ``out``, else sorted names (integer labels
    keep their value).

    The split being (re)written does not count: re-running it after fixing a class name in the
    label file must not bring the old classes back. Splits another converter wrote are not
    inherited: the writer refuses to mix datasets whose classes differ (``shards.writer``).
    """
    if manifest_path(out).is_file():
        others = [s for name, s in load_splits(out).items() if name != split and s.extra.get("source") == "folder"]
        if others:
            return others[0].class_names
    names = {row.label for row in rows} | {name for row in rows for name in (row.label_set or ())}
    if all(_is_integer(name) for name in names):
        values = sorted(int(name) for name in names)
        if values[0] < 0:
            line = next(row.line for row in rows if str(values[0]) in (row.label, *(row.label_set or ())))
            raise LabelFileError(
                f"{labels_file}:{line}: negative class index {values[0]}; integer classes count from 0"
            )
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
    rows = read_rows(labels_file, unlabelled) if unlabelled else canonical_rows(read_rows(labels_file))
    class_names = unlabelled_class_names(out, split) if unlabelled else class_names_for(rows, out, split, labels_file)
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
    if row.label_set is not None and row.label not in row.label_set:
        raise LabelFileError(
            f"{where}: label {row.label!r} is not in its own labels set {list(row.label_set)}; "
            "the set lists every class in the image, the label included"
        )
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
