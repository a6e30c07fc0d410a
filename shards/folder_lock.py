"""One writer per output folder: an exclusive ``flock`` on ``OUT/.make-shards.lock``.

Two conversions into one ``--out`` would delete each other's partial shards and overwrite each
other's manifest entries. The lock is taken without waiting by a conversion (the error names the
folder and the other process's pid, which the holder writes into the lock file) and with a short
wait by a lone manifest update. It is re-entrant within a thread, so a conversion that holds it can
call functions that take it again. The kernel drops an ``flock`` when its holder dies, so a killed
conversion never leaves the folder locked.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shards.errors import ShardError

LOCK_NAME = ".make-shards.lock"
_POLL_S = 0.05


class FolderBusyError(ShardError):
    """Another process (or thread) is writing the same output folder."""


_held: dict[str, tuple[int, int]] = {}  # real folder path -> (descriptor, thread) of this process's lock
_registry = threading.Lock()


@contextmanager
def output_lock(
    folder: Path, wait_s: float = 0.0, lock_name: str = LOCK_NAME, writer: str = "make-shards"
) -> Iterator[None]:
    """Hold the folder's lock for the ``with`` block; creates ``folder`` (removed again on exit
    when this call created it and it is still empty). Raises ``FolderBusyError`` after ``wait_s``.
    ``lock_name`` and ``writer`` (the command, in the error) let another tool lock its own folders."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    with _registry:
        holder = _held.get(key)
    if holder is not None:
        if holder[1] != threading.get_ident():
            raise FolderBusyError(
                f"{folder} is being written by another thread of this process; write it from one thread"
            )
        yield  # held by this thread already (a conversion updating its manifest)
        return
    created = _prepare_folder(folder)
    try:
        fd = _acquire(folder / lock_name, wait_s, writer)
    except BaseException:
        _remove_if_empty(folder, created)
        raise
    with _registry:
        _held[key] = (fd, threading.get_ident())
    try:
        yield
    finally:
        with _registry:
            del _held[key]
        _release(folder / lock_name, fd, created)


def _prepare_folder(folder: Path) -> bool:
    """Make ``folder`` if needed; True when this call made it."""
    if folder.exists() and not folder.is_dir():
        raise ShardError(
            f"output folder {folder} exists and is not a folder; give the path of a folder (new or existing)"
        )
    if folder.is_dir():
        return False
    folder.mkdir(parents=True, exist_ok=True)  # OSError (read-only parent...) names the path
    return True


def _acquire(path: Path, wait_s: float, writer: str) -> int:
    folder = path.parent
    deadline = time.monotonic() + wait_s
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            if time.monotonic() >= deadline:
                raise FolderBusyError(
                    f"output folder {folder} is being written by another {writer} process ({owner}, per {path}); "
                    "wait for it to finish or choose another --out"
                ) from None
            time.sleep(_POLL_S)
            continue
        # The previous holder unlinks the file before unlocking: if it did so while we waited, the
        # inode we locked is no longer the lock file, and a third process may lock the new one.
        if _is_current(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _read_owner(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"


def _is_current(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)


def _release(path: Path, fd: int, created: bool) -> None:
    try:
        path.unlink(missing_ok=True)  # while still locked: see _acquire
    finally:
        os.close(fd)
    _remove_if_empty(path.parent, created)


def _remove_if_empty(folder: Path, created: bool) -> None:
    """A run that failed before writing anything leaves no empty output folder behind."""
    if created:
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty (or already gone): keep it
