"""Running a command: known errors become one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import logging

import typer

from engine.checkpoint import CheckpointError
from engine.run_folder import RunFolderError
from shards.manifest import ShardError


def run_cli(command: typer.Typer) -> None:
    """Run a typer app: known errors as one line on stderr with exit status 2, no traceback."""
    from engine.commands.export import ExportError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        command()
    except (ExportError, CheckpointError, RunFolderError, ShardError, FileNotFoundError, ValueError) as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
