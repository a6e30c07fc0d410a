"""Running a command: known errors become one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from engine.checkpoint import CheckpointError
from engine.run_folder import RunFolderError
from shards.manifest import ShardError

# What the file system says about a path the user gave (its message names the path): user errors, not bugs.
PATH_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


class OutPathError(ValueError):
    """An ``--out`` that cannot be what the command writes: a file where a folder goes, or the reverse."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors a command reports as one line: each names the input (file, key, flag) at fault."""
    from engine.commands.export import ExportError

    return (ExportError, CheckpointError, RunFolderError, ShardError, ValueError, *PATH_ERRORS)


def run_cli(command: typer.Typer) -> None:
    """Run a typer app: known errors as one line on stderr with exit status 2, no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        command()
    except user_errors() as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


def _file_above(path: Path) -> Path | None:
    """The nearest existing path among ``path`` and its parents, where it is not a folder."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def check_out_folder(path: Path, flag: str = "--out") -> None:
    """``path`` is (or can become) a folder: neither it nor a folder above it is a file."""
    path = Path(path)
    blocking = _file_above(path)
    if blocking == path:
        raise OutPathError(f"{flag} {path} is a file; this command writes a folder there: choose another {flag}")
    if blocking is not None:
        raise OutPathError(f"{flag} {path}: {blocking} is a file, not a folder; choose another {flag}")


def check_out_file(path: Path, flag: str = "--out") -> None:
    """``path`` is (or can become) a file: it is not a folder, and no folder above it is a file."""
    path = Path(path)
    if path.is_dir():
        raise OutPathError(f"{flag} {path} is a folder; give the name of a file to write")
    if (blocking := _file_above(path.parent)) is not None:
        raise OutPathError(f"{flag} {path}: {blocking} is a file, not a folder; choose another {flag}")
