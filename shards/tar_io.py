"""Tar shard files and their DALI index files (the ``wds2idx`` "v1.2" text format).

An index file lists, per sample, ``ext offset size name`` for each member, offsets being the
byte position of the member's data in the tar. DALI's ``fn.readers.webdataset`` reads it to
seek instead of scanning; the torch pipeline uses the same file for random access.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from shards.errors import with_filename

INDEX_VERSION = "v1.2"
# Fixed tar header fields: identical inputs give byte-identical shards, so checksums are
# reproducible and a resumed conversion ends with the same manifest as an uninterrupted one.
_FIXED_MTIME = 1_600_000_000


@dataclass(frozen=True)
class Member:
    """One tar member's data location."""

    ext: str
    offset: int
    size: int
    name: str


def split_name(name: str) -> tuple[str, str]:
    """``KEY.ext`` -> (KEY, ext), splitting at the first dot of the base name (as DALI does)."""
    base_start = name.rfind("/") + 1
    dot = name.find(".", base_start)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


class TarShardFile:
    """A tar being written, with the index entries of what it holds so far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar = tarfile.open(path, "w", format=tarfile.GNU_FORMAT)
        self.samples: list[list[Member]] = []

    def add_sample(self, members: list[tuple[str, bytes]]) -> None:
        entries = []
        for name, data in members:
            info = _member_info(name, len(data))
            offset_data = self._tar.offset + self._header_bytes(info)
            try:
                self._tar.addfile(info, io.BytesIO(data))
            except OSError as error:
                raise with_filename(error, self.path) from error
            entries.append(Member(split_name(name)[1], offset_data, info.size, name))
        self.samples.append(entries)

    def size_with(self, members: list[tuple[str, bytes]]) -> int:
        """Bytes the closed tar would have with ``members`` added: headers, padding and end blocks."""
        offset = self._tar.offset
        for name, data in members:
            offset += self._header_bytes(_member_info(name, len(data))) + _round_up(len(data), tarfile.BLOCKSIZE)
        # close() writes two zero blocks, then pads the file to a whole tar record
        return _round_up(offset + 2 * tarfile.BLOCKSIZE, tarfile.RECORDSIZE)

    def _header_bytes(self, info: tarfile.TarInfo) -> int:
        # GNU long names take extra header blocks: measure, do not assume 512
        return len(info.tobuf(self._tar.format, self._tar.encoding, self._tar.errors))

    def close(self) -> None:
        try:
            self._tar.close()
            with open(self.path, "rb+") as handle:
                os.fsync(handle.fileno())
        except OSError as error:
            raise with_filename(error, self.path) from error

    def discard(self) -> None:
        """Close (ignoring errors: the disk may be full) and delete the file."""
        try:
            self._tar.fileobj.close()  # not TarFile.close(): that would write the end blocks
        except OSError:
            pass
        self.path.unlink(missing_ok=True)


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _FIXED_MTIME
    info.mode = 0o644
    return info


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def format_index(samples: list[list[Member]]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for sample in samples:
        lines.append(" ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in sample))
    return "\n".join(lines) + "\n"


def read_index(path: Path) -> list[list[Member]]:
    """Parse an index file; raises ValueError naming the file when it is malformed."""
    lines = Path(path).read_text().splitlines()
    try:
        version, count = lines[0].split()
        if version != INDEX_VERSION:
            raise ValueError(f"version {version}, expected {INDEX_VERSION}")
        samples = []
        for line in lines[1:]:
            fields = line.split()
            if len(fields) % 4:
                raise ValueError(f"line {line[:60]!r} does not hold (ext offset size name) groups")
            samples.append(
                [
                    Member(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                    for i in range(0, len(fields), 4)
                ]
            )
        if len(samples) != int(count):
            raise ValueError(f"header says {count} samples, file lists {len(samples)}")
    except (ValueError, IndexError) as error:
        raise ValueError(f"malformed index file {path}: {error}") from None
    return samples
