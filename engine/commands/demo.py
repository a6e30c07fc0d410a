"""The main job (``make demo``): the paper's multi-label grid experiment, softmax vs sigmoid vs MILe.

Every method trains from ``engine/configs/digits_grid.toml`` with the same budget; each method's
learning rate (and MILe's rho) come from ``engine/configs/demo/methods.toml``, chosen on the tune
split (docs/TUNING.md). Writes to ``--out``:
``table.md`` / ``table.csv`` (per method: F1@theta, coverage, F1 at matched coverage, top-|T| F1,
label-ranking AP, secondary mAP, top-1, mean ± std over seeds; and rows for predictors that need no
model), ``f1_curve.png`` (F1@0.25 over training), ``f1_vs_coverage.png`` (F1 against coverage
as the prediction set grows: whether a method is better or only predicts more labels) and
``phases.png`` / ``phases.csv`` (MILe's teacher and student at the end of every phase), all made
by ``engine.commands.report`` from the run folders, as ``tools/report.py OUT`` makes them. Running it again
reuses finished runs of the same config and resumes interrupted ones; it never deletes a run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import typer

from engine.commands.report import METHOD_ORDER, find_runs, write_report
from engine.config import RunConfig, build_config, default_config_path, load_toml, packaged_config, tomllib
from engine.options import CONFIG, DEVICE, NUM_STEPS, OUT
from engine.run_folder import RunFolderError
from engine.runs import train_or_reuse
from shards.command_options import command_app

METHODS = METHOD_ORDER


def default_method_settings() -> dict[str, dict[str, Any]]:
    """Each method's own settings (chosen on the tune split, docs/TUNING.md), applied over the base config."""
    return tomllib.loads(packaged_config("demo/methods.toml").read_text())


def method_config(
    base: dict[str, Any],
    method: str,
    out_root: Path,
    overrides: dict[str, Any],
    seed_index: int = 0,
    method_settings: dict[str, dict[str, Any]] | None = None,
) -> RunConfig:
    """The run config of one method and seed: base < the method's settings < overrides. Seed index 0
    keeps the config's seed and ``OUT/METHOD``."""
    settings = {
        **(method_settings or {}).get(method, {}),
        **{k: v for k, v in overrides.items() if v is not None},
        "method.name": method,
    }
    config = build_config(base, settings)
    folder = out_root / (method if seed_index == 0 else f"{method}-seed{config.seed + seed_index}")
    return build_config(base, {**settings, "seed": config.seed + seed_index, "out_dir": str(folder)})


# -- the command ----------------------------------------------------------------------------


def main(
    config: Optional[Path] = CONFIG.option(
        help="Experiment config for every method (default: engine/configs/digits_grid.toml with each method's tuned "
        "settings from engine/configs/demo/methods.toml).",
    ),
    out: Path = OUT.option(default=Path("runs/demo"), help="Folder for the runs, the table and the plots."),
    steps: Optional[int] = NUM_STEPS.option(default=None, help="Override the step budget (all methods)."),
    seeds: int = typer.Option(
        1, "--seeds", min=1, help="Train every method with N seeds (config seed, +1, ...); the table shows mean ± std."
    ),
    device: Optional[str] = DEVICE.option(default=None, help=f"{DEVICE.help} Default: the config's."),
) -> None:
    """Train softmax, sigmoid and MILe on the digit grid with one budget and print the comparison table."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    base = load_toml(config or default_config_path())
    overrides = {"num_steps": steps, "device": device}
    settings: dict[str, dict[str, Any]] = default_method_settings() if config is None else {}  # --config as it is
    configs = {
        m: [method_config(base, m, out, overrides, i, settings) for i in range(seeds)] for m in METHODS
    }  # all checked before any training
    out.mkdir(parents=True, exist_ok=True)
    for method, runs in configs.items():
        print(f"== {method} ==")
        for run_config in runs:
            train_or_reuse(run_config)
    # the table and plots come from the run folders alone: `tools/report.py OUT` writes the same
    report = write_report(out, find_runs([Path(c.out_dir) for runs in configs.values() for c in runs]))
    summaries = {
        g.label: [{**r.summary, "wall_s": r.wall_s} for r in g.runs if r.summary is not None] for g in report.groups
    }
    (out / "summaries.json").write_text(
        json.dumps({"runs": summaries, "curves": report.curves, "trivial": report.trivial}, indent=1) + "\n"
    )
    print((out / "table.md").read_text())  # plain Markdown: wide tables stay readable in any terminal
    print(f"wrote {', '.join(str(path) for path in report.files)}")


app = command_app(completion=True)
app.command()(main)


def cli() -> None:
    from engine.config import ConfigError
    from engine.trainer import RunInterrupted

    try:
        app()
    except RunInterrupted as stopped:
        typer.secho(f"{stopped}\nRun `make demo` again to continue where it stopped.", fg=typer.colors.YELLOW, err=True)
        raise SystemExit(stopped.exit_code) from None
    except (RunFolderError, ConfigError) as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
