"""CelebA source: the 40 binary attributes as a multi-label target, split by the official partition.

Layout under ``--root`` (the Google-Drive release; ``Anno/`` and ``Eval/`` sub-folders also work):
``list_attr_celeba.txt`` (a count line, the attribute names, then ``NAME v1 ... v40`` with values
±1 padded by several spaces), ``list_eval_partition.txt`` (``NAME 0|1|2`` = train/val/test) and the
images in ``img_align_celeba/``. Samples carry no single label (``NO_LABEL``); their multi-label set
is the indices of the attributes equal to 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shards.format import NO_LABEL, LabelKind
from shards.sources.common import (
    INTEGER_PATTERN,
    PathGuard,
    PlannedSplit,
    SourceError,
    check_listed_files_exist,
    file_item,
    key_from_relpath,
    read_labelled_lines,
    read_lines,
    require_dir,
    require_file,
)
from shards.writer import SplitSpec

ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_DIR = "img_align_celeba"
PARTITIONS = {0: "train", 1: "val", 2: "test"}
SPLITS = tuple(PARTITIONS.values())


@dataclass(frozen=True)
class CelebAOptions:
    """What to convert (one ``celeba`` command line)."""

    root: Path
    splits: tuple[str, ...] | None = None  # None = train, val and test
    follow_symlinks: bool = False  # read symlinked images whose target is outside root


@dataclass(frozen=True)
class Attributes:
    """Attribute names and, per image name, the indices of the attributes equal to 1."""

    names: list[str]
    positives: dict[str, tuple[int, ...]]


def celeba_plan(options: CelebAOptions) -> list[PlannedSplit]:
    """List and check the requested splits; raises ``SourceError`` before anything is written."""
    root = require_dir(options.root, "CelebA root")
    attributes = read_attributes(require_file(ATTR_FILE, [root, root / "Anno"], "CelebA attribute file"))
    partition_file = require_file(PARTITION_FILE, [root, root / "Eval"], "CelebA partition file")
    partition = read_partition(partition_file, attributes)
    image_dir = image_folder(root)
    guard = PathGuard(root, options.follow_symlinks)
    planned = []
    for split in options.splits or SPLITS:
        items = [
            file_item(
                guard,
                f"{image_dir}/{name}",
                key_from_relpath(name),
                NO_LABEL,
                attributes.positives[name],
                where=f"{partition_file}: {name!r}",
            )
            for name, part in partition.items()
            if part == split
        ]
        check_listed_files_exist(items, str(partition_file))
        extra = {"source": "celeba", "attribute_file": ATTR_FILE, "partition_file": PARTITION_FILE}
        planned.append(PlannedSplit(SplitSpec(split, LabelKind.ATTRIBUTES, list(attributes.names), extra), items))
    return planned


def image_folder(root: Path) -> str:
    """``img_align_celeba``, or the doubled ``img_align_celeba/img_align_celeba`` of some mirrors."""
    folder = require_dir(root / IMAGE_DIR, "CelebA image folder")
    return f"{IMAGE_DIR}/{IMAGE_DIR}" if (folder / IMAGE_DIR).is_dir() else IMAGE_DIR


def read_attributes(path: Path) -> Attributes:
    """Parse ``list_attr_celeba.txt``; any malformed line is an error naming it."""
    lines = read_lines(path, "CelebA attribute file")
    if len(lines) < 2 or not INTEGER_PATTERN.fullmatch(lines[0].strip()):
        raise SourceError(f"{path}:1: expected the image count, then the attribute names")
    names = lines[1].split()
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SourceError(f"{path}:2: attribute {repeated[0]!r} is named {names.count(repeated[0])} times")
    positives: dict[str, tuple[int, ...]] = {}
    first_line: dict[str, int] = {}
    for number, text in enumerate(lines[2:], start=3):
        fields = text.split()  # split() on any run of spaces: the file pads values to width 2
        if not fields:
            continue
        values = fields[1:]
        if len(values) != len(names) or any(v not in ("1", "-1") for v in values):
            raise SourceError(f"{path}:{number}: expected a name and {len(names)} values of 1 or -1")
        if fields[0] in first_line:
            raise SourceError(f"{path}:{number}: {fields[0]!r} is listed again (first on line {first_line[fields[0]]})")
        first_line[fields[0]] = number
        positives[fields[0]] = tuple(i for i, v in enumerate(values) if v == "1")
    if len(positives) != int(lines[0]):
        raise SourceError(f"{path}: the count line says {int(lines[0])} images, the file lists {len(positives)}")
    return Attributes(names, positives)


def read_partition(path: Path, attributes: Attributes) -> dict[str, str]:
    """{image name: split}; every image must have attributes and every attributed image a split."""
    partition = {}
    for line in read_labelled_lines(path, "CelebA partition file"):
        if line.label not in PARTITIONS:
            raise SourceError(f"{path}:{line.line}: partition {line.label} is not 0 (train), 1 (val) or 2 (test)")
        partition[line.relpath] = PARTITIONS[line.label]
    no_attributes = [n for n in partition if n not in attributes.positives]
    no_split = [n for n in attributes.positives if n not in partition]
    for missing, where in ((no_attributes, "attributes"), (no_split, "partition")):
        if missing:
            raise SourceError(f"{len(missing)} images have no {where} entry (e.g. {missing[:3]}); check {path.parent}")
    return partition
