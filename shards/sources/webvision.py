"""WebVision 1.0 and mini-WebVision source: the ``info/`` file lists, Google/Flickr train images, val.

Layout under ``--root``: ``info/train_filelist_google.txt`` and ``info/train_filelist_flickr.txt``
(lines ``relpath label``, paths relative to the root), ``info/val_filelist.txt`` (paths relative to
``val_images_256/``) and ``info/synsets.txt`` (line i = WNID of class i). mini-WebVision is the
Google subset with label < 50; its 50 WNIDs are recorded in the manifest so the ImageNet-val
evaluation split can be made with the same classes (``imagenet --class-list``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards.format import LabelKind
from shards.sources.common import (
    LabelledLine,
    PathGuard,
    PlannedSplit,
    SourceError,
    check_listed_files_exist,
    file_item,
    imagenet_wnids,
    key_from_relpath,
    list_image_files,
    read_labelled_lines,
    read_wnid_list,
    require_dir,
)
from shards.writer import SourceItem, SplitSpec

SOURCES = ("google", "flickr")
SPLITS = ("train", "val")
MINI_NUM_CLASSES = 50
MINI_SOURCES = ("google",)
INFO_DIR = "info"
TRAIN_LIST = "train_filelist_{}.txt"
VAL_LIST = "val_filelist.txt"
VAL_DIR = "val_images_256"
SYNSETS_FILE = "synsets.txt"


@dataclass(frozen=True)
class WebVisionOptions:
    """What to convert (one ``webvision`` command line)."""

    root: Path
    mini: bool = False
    sources: tuple[str, ...] | None = None  # None = both, or Google only with --mini
    splits: tuple[str, ...] | None = None  # None = train, and val when its list exists
    follow_symlinks: bool = False  # read listed symlinks whose target is outside root

    def __post_init__(self) -> None:
        unknown = [s for s in self.sources or () if s not in SOURCES]
        if unknown or self.sources == ():
            raise ValueError(f"--sources: choose from {', '.join(SOURCES)}, got {self.sources}")
        if self.mini and self.sources is not None and set(self.sources) != set(MINI_SOURCES):
            raise ValueError("mini-WebVision is the Google subset: drop --sources or give --sources google")

    @property
    def train_sources(self) -> tuple[str, ...]:
        return self.sources or (MINI_SOURCES if self.mini else SOURCES)


def webvision_plan(options: WebVisionOptions) -> list[PlannedSplit]:
    """List and check the requested splits; raises ``SourceError`` before anything is written."""
    root = require_dir(options.root, "WebVision root")
    info = require_dir(root / INFO_DIR, "WebVision info folder")
    all_classes, synsets_source = class_wnids(info)
    classes = all_classes[:MINI_NUM_CLASSES] if options.mini else all_classes
    if len(classes) < (MINI_NUM_CLASSES if options.mini else 1):
        raise SourceError(
            f"{info / SYNSETS_FILE} lists {len(all_classes)} classes; mini-WebVision needs {MINI_NUM_CLASSES}"
        )
    extra: dict[str, Any] = {"source": "webvision", "mini": options.mini, "synsets_file": synsets_source}
    if options.mini:
        extra["synsets"] = list(classes)  # = class_names; kept under its own name for the ImageNet-val split
    guard = PathGuard(root, options.follow_symlinks)
    planned = []
    for split in requested_splits(info, options.splits):
        if split == "train":
            items = train_items(guard, info, options.train_sources, len(all_classes), len(classes))
            split_extra = {**extra, "sources": list(options.train_sources)}
        else:
            items, split_extra = val_items(guard, info, len(all_classes), len(classes)), extra
        planned.append(PlannedSplit(SplitSpec(split, LabelKind.SINGLE, list(classes), split_extra), items))
    return planned


def class_wnids(info: Path) -> tuple[list[str], str]:
    """Class i's WNID from ``info/synsets.txt``; without it, the sorted ImageNet-1k list (same order)."""
    path = info / SYNSETS_FILE
    if path.is_file():
        return read_wnid_list(path, "WebVision synsets"), f"{INFO_DIR}/{SYNSETS_FILE}"
    print(f"note: {path} missing; using the sorted ImageNet-1k WNIDs, the order WebVision 1.0 uses")
    return imagenet_wnids(), "timm:imagenet_synsets.txt"


def requested_splits(info: Path, splits: tuple[str, ...] | None) -> tuple[str, ...]:
    if splits is not None:
        return splits
    return SPLITS if (info / VAL_LIST).is_file() else ("train",)


def train_items(
    guard: PathGuard, info: Path, sources: tuple[str, ...], num_all: int, num_kept: int
) -> list[SourceItem]:
    items: list[SourceItem] = []
    for source in sources:
        list_file = info / TRAIN_LIST.format(source)
        if not list_file.is_file():
            raise SourceError(f"train list {list_file} does not exist (choose --sources among those you have)")
        lines = read_labelled_lines(list_file, "WebVision train list")
        source_items = labelled_items(guard, "", lines, list_file, num_all, num_kept)
        check_listed_files_exist(source_items, str(list_file))
        items += source_items
    return items


def val_items(guard: PathGuard, info: Path, num_all: int, num_kept: int) -> list[SourceItem]:
    root = guard.root
    list_file = info / VAL_LIST
    if not list_file.is_file():
        raise SourceError(f"val list {list_file} does not exist")
    lines = read_labelled_lines(list_file, "WebVision val list")
    listed = {line.relpath for line in lines}
    unlabelled = [n for n in list_image_files(require_dir(root / VAL_DIR, "WebVision val folder")) if n not in listed]
    if unlabelled:
        raise SourceError(
            f"{len(unlabelled)} images in {root / VAL_DIR} have no label in {list_file}, e.g. {unlabelled[:3]}"
        )
    items = labelled_items(guard, VAL_DIR, lines, list_file, num_all, num_kept)
    check_listed_files_exist(items, str(list_file))
    return items


def labelled_items(
    guard: PathGuard, folder: str, lines: list[LabelledLine], list_file: Path, num_all: int, num_kept: int
) -> list[SourceItem]:
    """Items of the lines whose label is a kept class (label < num_kept); other labels must be < num_all."""
    items = []
    for line in lines:
        if not 0 <= line.label < num_all:
            raise SourceError(f"{list_file}:{line.line}: label {line.label} outside [0, {num_all})")
        if line.label < num_kept:
            relpath = f"{folder}/{line.relpath}" if folder else line.relpath
            where = f"{list_file}:{line.line}"
            items.append(file_item(guard, relpath, key_from_relpath(line.relpath), line.label, where=where))
    return items


def write_class_list(path: Path, wnids: list[str]) -> None:
    """WNIDs one per line, the input ``imagenet --class-list`` expects."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w}\n" for w in wnids))
