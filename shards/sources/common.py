"""Helpers shared by the dataset sources: listing folders, reading label lists, planning splits."""

from __future__ import annotations

import hashlib
import os
import pkgutil
import posixpath
import re
import stat
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from shards.folder_lock import output_lock
from shards.format import NO_LABEL, safe_key
from shards.manifest import ShardError, SplitManifest
from shards.writer import SourceItem, SplitSpec, WriterSettings, make_room, write_split

# Extensions listed as images; the bytes are still checked by decoding (a .JPEG may hold a PNG).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
WNID_PATTERN = re.compile(r"^n\d{8}$")
INTEGER_PATTERN = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() also takes '²', which int() refuses
_EXISTENCE_PROBES = 64  # listed files stat-ed up front to tell a wrong --root from a few missing files


class SourceError(ShardError):
    """A dataset layout that cannot be converted as it is; the message names the file or folder."""


@dataclass(frozen=True)
class LabelledLine:
    """One ``relpath label`` line of a list file (WebVision lists, CelebA partition)."""

    line: int
    relpath: str
    label: int


@dataclass(frozen=True)
class PlannedSplit:
    """A split fully listed and checked, ready to be written."""

    spec: SplitSpec
    items: list[SourceItem]


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise SourceError(f"{what} {path} does not exist or is not a folder")
    return path


def find_file(name: str, folders: Iterable[Path]) -> Path | None:
    """The first ``folder/name`` that exists, or None."""
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    return None


def require_file(name: str, folders: Sequence[Path], what: str) -> Path:
    found = find_file(name, folders)
    if found is None:
        raise SourceError(f"{what} {name} not found; looked in {', '.join(str(f) for f in folders)}")
    return found


def read_text(path: Path, what: str) -> str:
    """A label file's text (UTF-8, a leading byte-order mark dropped); an unreadable file or one
    that is not UTF-8 is an error naming the file and line, not a traceback."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SourceError(f"{what} {path} is unreadable: {error.strerror or error}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise SourceError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the {what} as UTF-8"
        ) from None


def read_lines(path: Path, what: str) -> list[str]:
    """Text lines of a label file (see ``read_text``)."""
    return read_text(path, what).splitlines()


def read_labelled_lines(path: Path, what: str) -> list[LabelledLine]:
    """Parse ``relpath label`` lines (blank lines ignored); errors name the file and line, a path
    listed twice included (naming both lines)."""
    out = []
    first_line: dict[str, int] = {}
    for number, text in enumerate(read_lines(path, what), start=1):
        if not text.strip():
            continue
        parts = text.strip().rsplit(maxsplit=1)  # rsplit: a path may contain spaces, the label cannot
        if len(parts) != 2 or not INTEGER_PATTERN.fullmatch(parts[1]):
            raise SourceError(f"{path}:{number}: expected 'path label', got {text.strip()[:80]!r}")
        if parts[0] in first_line:
            raise SourceError(f"{path}:{number}: {parts[0]!r} is listed again (first on line {first_line[parts[0]]})")
        first_line[parts[0]] = number
        out.append(LabelledLine(number, parts[0], int(parts[1])))
    if not out:
        raise SourceError(f"{what} {path} lists no images")
    return out


def read_wnid_list(path: Path, what: str) -> list[str]:
    """WNIDs, the first token of each non-empty line (so ``nXXXXXXXX name ...`` lines work too)."""
    wnids = []
    for number, text in enumerate(read_lines(path, what), start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        token = text.split()[0]
        if not WNID_PATTERN.match(token):
            raise SourceError(f"{path}:{number}: {token!r} is not a WordNet ID (nXXXXXXXX)")
        wnids.append(token)
    duplicates = sorted(w for w, n in Counter(wnids).items() if n > 1)
    if duplicates:
        raise SourceError(f"{what} {path} lists {duplicates[:3]} more than once")
    if not wnids:
        raise SourceError(f"{what} {path} lists no WordNet IDs")
    return wnids


def imagenet_wnids() -> list[str]:
    """The 1,000 ImageNet-1k WNIDs in sorted order (class index = position), as timm ships them."""
    data = pkgutil.get_data("timm.data", "_info/imagenet_synsets.txt")
    if data is None:  # pragma: no cover - only with a broken timm install
        raise SourceError("timm does not ship data/_info/imagenet_synsets.txt; reinstall timm")
    wnids = data.decode("ascii").split()
    if len(wnids) != 1000 or wnids != sorted(wnids):
        raise SourceError("timm's imagenet_synsets.txt is not the sorted list of 1,000 WNIDs")
    return wnids


def list_subfolders(parent: Path, pattern: re.Pattern[str] | None = None) -> list[str]:
    """Sorted names of the sub-folders of ``parent`` (matching ``pattern`` when given)."""
    with os.scandir(parent) as entries:
        names = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    return sorted(n for n in names if pattern is None or pattern.match(n))


def list_image_files(folder: Path) -> list[str]:
    """Sorted image file names in ``folder``; only directory entries are read, never the bytes.
    Names that are not UTF-8 come back as ``os.listdir`` decodes them (see ``is_utf8_name``)."""
    with os.scandir(folder) as entries:
        names = [
            e.name
            for e in entries
            if not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_SUFFIXES and e.is_file()
        ]
    return sorted(names)


def is_utf8_name(name: str) -> bool:
    """False for a file name whose bytes are not UTF-8 (``os.scandir`` hands those over with
    surrogate escapes, which cannot be written to a manifest or a tar member)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escaped_name(name: str) -> str:
    """A printable form of a file name: its non-UTF-8 bytes as ``\\xNN`` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


NON_UTF8_NAME = "file name is not valid UTF-8 (its bytes are shown as \\xNN); rename the file to convert it"


def skipped_item(relpath: str, reason: str) -> SourceItem:
    """An input known to be unusable before reading it; the writer lists it as skipped with ``reason``.
    Its key only has to be unique and valid: nothing is written under it."""
    key = "skipped_" + hashlib.sha256(relpath.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return SourceItem(key=key, label=NO_LABEL, source=escaped_name(relpath), skip=reason)


@dataclass
class PathGuard:
    """Keeps listed paths inside a dataset root: absolute paths and ``..`` that leave it are refused,
    and (unless ``follow_symlinks``) so is any symlink on the way whose target lies outside it.
    A hostile label file could otherwise put ``/etc/passwd`` or ``../../secret.jpg`` into shards."""

    root: Path
    follow_symlinks: bool = False
    _real_root: str = field(init=False, repr=False)
    _safe_dirs: set[str] = field(init=False, repr=False, default_factory=set)

    def __post_init__(self) -> None:
        self._real_root = os.path.realpath(self.root)

    def path(self, relpath: str, where: str) -> str:
        """``root/relpath`` after the checks; ``where`` (file:line) starts the error message."""
        normal = posixpath.normpath(relpath)
        if posixpath.isabs(relpath) or normal == ".." or normal.startswith("../"):
            raise SourceError(f"{where}: path {relpath!r} leaves {self.root} (absolute or '..'); list paths inside it")
        if not self.follow_symlinks:
            self._check_links(normal, relpath, where)
        return os.path.join(self.root, normal)

    def _check_links(self, normal: str, relpath: str, where: str) -> None:
        parts = normal.split("/")
        for depth in range(1, len(parts) + 1):
            prefix = os.path.join(self.root, *parts[:depth])
            if prefix in self._safe_dirs:
                continue
            try:
                mode = os.lstat(prefix).st_mode
            except OSError:
                return  # missing: the writer skips it with the reason
            if stat.S_ISLNK(mode) and not self._inside(os.path.realpath(prefix)):
                raise SourceError(
                    f"{where}: {relpath!r} goes through the symlink {prefix} -> {os.path.realpath(prefix)}, "
                    f"outside {self.root}; pass --follow-symlinks to read it anyway"
                )
            if depth < len(parts):
                self._safe_dirs.add(prefix)

    def _inside(self, real: str) -> bool:
        return os.path.commonpath([real, self._real_root]) == self._real_root


def key_from_relpath(relpath: str) -> str:
    """A sample key from a path relative to the dataset root, without its extension."""
    return safe_key(str(PurePosixPath(relpath).with_suffix("")))


def file_item(
    guard: PathGuard,
    relpath: str,
    key: str,
    label: int,
    label_set: tuple[int, ...] | None = None,
    meta: dict | None = None,
    where: str | None = None,
) -> SourceItem:
    """A ``SourceItem`` for ``root/relpath`` (checked by ``guard``; errors start with ``where``, by
    default the path); the manifest records only the relative path. A name that is not UTF-8
    becomes a skipped item."""
    if not is_utf8_name(relpath):
        return skipped_item(relpath, NON_UTF8_NAME)
    path = guard.path(relpath, where or str(guard.root / relpath))
    return SourceItem(key=key, label=label, source=relpath, path=path, label_set=label_set, meta=meta or {})


def check_listed_files_exist(items: Sequence[SourceItem], listed_in: str) -> None:
    """Fail early when none of a sample of listed files exists (a wrong --root, not a few bad files).

    Individually missing files are not an error: the writer skips them with a reason, like any
    unreadable file.
    """
    if not items:
        return
    step = max(1, len(items) // _EXISTENCE_PROBES)
    probes = items[::step][:_EXISTENCE_PROBES]
    if not any(os.path.isfile(item.path or "") for item in probes):
        raise SourceError(
            f"none of {len(probes)} files listed in {listed_in} exists (e.g. {probes[0].path}); "
            "is --root the dataset's top folder?"
        )


def parse_splits(text: str | None, known: Sequence[str]) -> tuple[str, ...] | None:
    """``--splits a,b`` as a tuple (None = every split found); unknown names are an error."""
    if text is None:
        return None
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in known]
    if unknown or not names:
        raise SourceError(f"--splits {text!r}: choose from {', '.join(known)}")
    return names


def write_planned(
    out: Path, planned: Sequence[PlannedSplit], settings: WriterSettings, overwrite: bool = False
) -> list[SplitManifest]:
    """Write every planned split; an empty split, and (unless ``overwrite``) another dataset's splits
    in ``out`` with other classes (``shards.writer.make_room``), are refused before anything is written."""
    with output_lock(out):
        _check_planned(planned)
        make_room(out, [split.spec for split in planned], overwrite)
        return [write_split(out, split.spec, split.items, settings) for split in planned]


def _check_planned(planned: Sequence[PlannedSplit]) -> None:
    for split in planned:
        if not split.items:
            raise SourceError(f"split {split.spec.name}: no images found to convert")
        duplicates = [key for key, n in Counter(item.key for item in split.items).items() if n > 1]
        if duplicates:
            raise SourceError(f"split {split.spec.name}: several files map to the sample keys {duplicates[:3]}")
