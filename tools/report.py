#!/usr/bin/env python
"""``tools/report.py RUNS... --out DIR``: the comparison table (``table.md``, ``table.csv``) and plots
(an eval metric over training, F1 against coverage; for MILe, ``phases.png`` / ``phases.csv``: the
teacher and the student at the end of every phase) of finished runs, from their run folders alone.

RUNS are run folders, or folders holding run folders (a demo's or a sweep's ``--out``). Runs are
grouped by the config keys that tell experiments apart (or ``--group-by``); each cell is the mean ±
std over a group's seeds. A run without ``summary.json`` is listed as unfinished under the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from engine.options import OUT
from shards.command_options import command_app


def main(
    runs: list[Path] = typer.Argument(
        ..., help="Run folders, or folders holding run folders (a demo's or sweep's --out)."
    ),
    out: Path = OUT.option(default=Path("runs/report"), help="Folder for table.md, table.csv and the plots."),
    metrics: Optional[list[str]] = typer.Option(
        None,
        "--metrics",
        help="Summary keys to tabulate, e.g. top1, imagenet/val/top1 (repeat); default: the demo's columns and "
        "each extra eval set's top-1.",
    ),
    group_by: Optional[list[str]] = typer.Option(
        None,
        "--group-by",
        help="Config keys that make a row, e.g. method or method.rho (repeat); default: every key that differs "
        "between runs, seeds apart.",
    ),
    curve_metric: Optional[str] = typer.Option(
        None, "--curve-metric", help="Eval metric to plot over training steps (default f1@0.25, else top1)."
    ),
    score_models: bool = typer.Option(
        True,
        "--score-models/--no-score-models",
        help="Score each group's last checkpoint on its eval split for the F1-vs-coverage plot and the no-model "
        "rows (needs the data).",
    ),
) -> None:
    """Write the comparison table and plots of finished runs; unfinished ones are listed, not fatal."""
    import logging

    from engine.commands.report import find_runs, write_report
    from engine.commands.runner import check_out_folder, user_errors

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        check_out_folder(out)
        report = write_report(out, find_runs(runs), metrics or None, group_by or None, curve_metric, score_models)
    except user_errors() as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
    typer.echo((out / "table.md").read_text())
    typer.echo(f"wrote {', '.join(str(path) for path in report.files)}")


app = command_app(completion=True)
app.command()(main)

if __name__ == "__main__":
    app()
