#!/usr/bin/env python
"""``tools/sweep.py SWEEP.toml --out DIR``: run a grid of configs as separate resumable runs and
write ``DIR/sweep.csv`` and ``DIR/sweep.md`` (every run's scores, each method's chosen run marked),
and the comparison report of ``tools/report.py DIR`` (``table.md``, ``table.csv``, plots)."""

from __future__ import annotations

from pathlib import Path

import typer

from engine.options import OUT
from shards.command_options import command_app

COLUMNS = ["lrap", "f1@matched", "f1@top|T|", "secondary_map", "f1@0.25", "coverage@0.25", "top1"]


def main(
    sweep: Path = typer.Argument(..., help="Sweep TOML (base, overrides, [grid.METHOD] tables)."),
    out: Path = OUT.option(default=Path("runs/sweep"), help="Folder for the runs and the results table."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs and check their configs; train nothing."),
) -> None:
    """Run every configuration of a sweep; finished runs are reused, interrupted ones resumed."""
    import logging

    from engine.commands.runner import user_errors

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        _sweep(sweep, out, dry_run)
    except user_errors() as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


def _sweep(sweep: Path, out: Path, dry_run: bool) -> None:
    from engine.commands.report import find_runs, write_report
    from engine.commands.runner import check_out_folder
    from engine.commands.sweep import check_select_by, load_sweep, results_markdown, run_sweep, write_results

    check_out_folder(out)
    runs, select_by = load_sweep(sweep, out)
    if dry_run:
        for run in runs:
            typer.echo(f"{run.method:8s} {run.name}")
        return
    check_select_by(select_by, runs, sweep)
    out.mkdir(parents=True, exist_ok=True)
    results = run_sweep(runs)
    write_results(out, results, COLUMNS)
    table = results_markdown(results, COLUMNS, select_by)
    (out / "sweep.md").write_text(f"Selected by {select_by} (higher is better).\n\n" + table)
    typer.echo(table)
    report = write_report(out, find_runs([Path(run.config.out_dir) for run in runs]))  # what tools/report.py DIR writes
    typer.echo(f"wrote {out / 'sweep.md'}, {out / 'sweep.csv'}, {', '.join(str(path) for path in report.files)}")


app = command_app(completion=True)
app.command()(main)

if __name__ == "__main__":
    app()
