"""Atomic file writes: a reader sees a file's old contents or its new ones, never a torn mix.

Write to a hidden temporary sibling, fsync, then rename over the target. Shard folders, run
folders and exported models all write this way.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from shards.errors import with_filename


def temp_sibling(path: Path, suffix: str) -> Path:
    """A hidden sibling name no other process or call uses: ``.NAME.PID-RANDOM{suffix}``."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename: readers see the old or the new file.
    A failed write (a full disk) removes the temporary file and raises ``OSError`` naming ``path``."""
    tmp = temp_sibling(path, ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise with_filename(error, path) from error


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
