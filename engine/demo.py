"""The main job (``make demo``): the paper's multi-label grid experiment, softmax vs sigmoid vs MILe.

Every method trains from ``engine/configs/digits_grid.toml`` with the same budget; each method's
learning rate (and MILe's rho) come from ``engine/configs/demo/methods.toml``, chosen on the tune
split (docs/TUNING.md). Writes to ``--out``:
``table.md`` / ``table.csv`` (per method: F1@theta, coverage, F1 at matched coverage, top-|T| F1,
label-ranking AP, secondary mAP, top-1, mean ± std over seeds; and rows for predictors that need no
model), ``f1_curve.png`` (F1@0.25 over training) and ``f1_vs_coverage.png`` (F1 against coverage
as the prediction set grows: whether a method is better or only predicts more labels), all made
by ``engine.report`` from the run folders, as ``tools/report.py OUT`` makes them. Running it again
reuses finished runs of the same config and resumes interrupted ones; it never deletes a run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import typer

from engine.config import RunConfig, build_config, load_toml, tomllib
from engine.options import CONFIG, DEVICE, NUM_STEPS, OUT
from engine.report import METHOD_ORDER, WALL_FILE, find_runs, write_report
from engine.run_folder import CONFIG_NAME, RunFolderError, saved_config
from shards.command_options import command_app

METHODS = METHOD_ORDER


def default_method_settings() -> dict[str, dict[str, Any]]:
    """Each method's own settings (chosen on the tune split, docs/TUNING.md), applied over the base config."""
    from importlib import resources

    path = Path(str(resources.files("engine") / "configs" / "demo" / "methods.toml"))
    return tomllib.loads(path.read_text())


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


def run_method(config: RunConfig) -> dict[str, Any]:
    """Train one method, or reuse a finished run of the same config, or resume an interrupted one;
    a folder holding a run of another config is an error (the demo never deletes a run)."""
    from engine.distributed import init_distributed
    from engine.trainer import Trainer

    folder = Path(config.out_dir)
    resume = _check_existing(folder, config)
    if (folder / "summary.json").is_file():
        print(f"reusing the finished run in {folder}")
        wall = folder / WALL_FILE
        return {
            **json.loads((folder / "summary.json").read_text()),
            "wall_s": json.loads(wall.read_text()) if wall.is_file() else None,
        }
    started = time.perf_counter()
    summary = Trainer(config, init_distributed(config.device), resume=resume).run()
    summary["wall_s"] = time.perf_counter() - started
    (folder / WALL_FILE).write_text(json.dumps(summary["wall_s"]) + "\n")
    return summary


def _check_existing(folder: Path, config: RunConfig) -> bool:
    """True when ``folder`` holds an unfinished run of this very config (so it is resumed)."""
    if not (folder / CONFIG_NAME).is_file():
        return False
    if saved_config(folder) != config:
        raise RunFolderError(f"{folder} holds a run with another config; move it away, or pass --out to the demo")
    return (folder / "checkpoints" / "last.pt").is_file()


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
    from engine.cli import default_config_path

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
            run_method(run_config)
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
