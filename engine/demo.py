"""The main job (``make demo``): the paper's multi-label grid experiment, softmax vs sigmoid vs MILe.

Every method trains from ``engine/configs/digits_grid.toml`` with the same budget; each method's
learning rate (and MILe's rho) come from ``engine/configs/demo/methods.toml``, chosen on the tune
split (docs/TUNING.md). Writes to ``--out``:
``table.md`` / ``table.csv`` (per method: F1@theta, coverage, F1 at matched coverage, top-|T| F1,
label-ranking AP, secondary mAP, top-1, mean ± std over seeds; and rows for predictors that need no
model), ``f1_curve.png`` (F1@0.25 over training) and ``f1_vs_coverage.png`` (F1 against coverage
as the prediction set grows: whether a method is better or only predicts more labels).
Running it again reuses finished runs of the same config and resumes interrupted ones; it never
deletes a run.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import typer

from engine.config import RunConfig, build_config, load_toml, tomllib
from engine.metrics import coverage_curve, trivial_predictor_scores
from engine.run_folder import CONFIG_NAME, RunFolderError, read_metrics, saved_config

METHODS = ("softmax", "sigmoid", "mile")
# (column title, summary key, scale): F1-like values in %, set sizes as they are
TABLE_COLUMNS = (
    ("F1@0.25", "f1@0.25", 100), ("F1@0.5", "f1@0.5", 100), ("coverage@0.25", "coverage@0.25", 1),
    ("F1@matched", "f1@matched", 100), ("θ or m @matched", "threshold@matched", 1), ("top-T F1", "f1@top|T|", 100),
    ("LRAP", "lrap", 100), ("secondary mAP", "secondary_map", 100), ("top-1", "top1", 100),
)
PAPER_F1_025 = {"softmax": 28.69, "sigmoid": 29.10, "mile": 41.35}  # poster, multi-label MNIST table
CURVE_THETAS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
TRIVIAL_K_RANDOM = (1, 2)


def default_method_settings() -> dict[str, dict[str, Any]]:
    """Each method's own settings (chosen on the tune split, docs/TUNING.md), applied over the base config."""
    from importlib import resources

    path = Path(str(resources.files("engine") / "configs" / "demo" / "methods.toml"))
    return tomllib.loads(path.read_text())


def method_config(base: dict[str, Any], method: str, out_root: Path, overrides: dict[str, Any], seed_index: int = 0,
                  method_settings: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """The run config of one method and seed: base < the method's settings < overrides. Seed index 0
    keeps the config's seed and ``OUT/METHOD``."""
    settings = {**(method_settings or {}).get(method, {}), **{k: v for k, v in overrides.items() if v is not None}, "method.name": method}
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
        wall = folder / "demo_wall_s.json"
        return {**json.loads((folder / "summary.json").read_text()), "wall_s": json.loads(wall.read_text()) if wall.is_file() else None}
    started = time.perf_counter()
    summary = Trainer(config, init_distributed(config.device), resume=resume).run()
    summary["wall_s"] = time.perf_counter() - started
    (folder / "demo_wall_s.json").write_text(json.dumps(summary["wall_s"]) + "\n")
    return summary


def _check_existing(folder: Path, config: RunConfig) -> bool:
    """True when ``folder`` holds an unfinished run of this very config (so it is resumed)."""
    if not (folder / CONFIG_NAME).is_file():
        return False
    if saved_config(folder) != config:
        raise RunFolderError(f"{folder} holds a run with another config; move it away, or pass --out to the demo")
    return (folder / "checkpoints" / "last.pt").is_file()


# -- the table ------------------------------------------------------------------------------


def _value(summary: dict[str, Any], key: str) -> float | None:
    if key == "threshold@matched":  # sigmoid models report a threshold, softmax models a set size m
        return summary.get("theta@matched", summary.get("m@matched"))
    return summary.get(key)


def _cell(values: list[float], spec: str = ".2f") -> str:
    if len(values) == 1:
        return f"{values[0]:{spec}}"
    return f"{statistics.mean(values):{spec}} ± {statistics.stdev(values):{spec}}"


def method_rows(summaries: dict[str, list[dict[str, Any]]]) -> list[dict[str, str]]:
    """One row per method: each cell the mean ± standard deviation over its seeds."""
    rows = []
    for method, runs in summaries.items():
        row = {"method": method, "seeds": str(len(runs))}
        for title, key, scale in TABLE_COLUMNS:
            values = [_value(s, key) for s in runs]
            spec = ".3g" if key == "threshold@matched" else ".2f"  # thresholds near 0.01 need significant digits
            row[title] = "-" if any(v is None for v in values) else _cell([scale * v for v in values], spec)
        row["paper F1@0.25"] = f"{PAPER_F1_025[method]:.2f}"
        walls = [s["wall_s"] for s in runs if s.get("wall_s") is not None]
        row["wall s"] = f"{sum(walls):.0f}" if walls else "-"
        rows.append(row)
    return rows


def trivial_rows(trivial: dict[str, dict[str, float]], columns: list[str]) -> list[dict[str, str]]:
    """Predictors without a model (the given label, plus k random digits, every digit), so a reader
    sees what a number means: their F1 needs no threshold, so it fills the F1@theta columns."""
    rows = []
    for name, scores in trivial.items():
        row = {column: "-" for column in columns}
        row["method"] = f"no model: {name.replace('_', ' ')}"
        for title in ("F1@0.25", "F1@0.5"):
            row[title] = f"{100 * scores['f1']:.2f}"
        row["coverage@0.25"] = f"{scores['coverage']:.2f}"
        if "f1@top|T|" in scores:
            row["top-T F1"] = f"{100 * scores['f1@top|T|']:.2f}"
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(out_root: Path, rows: list[dict[str, str]], config: RunConfig, num_seeds: int) -> None:
    header = (
        "# Multi-label digit grid: softmax vs sigmoid vs MILe\n\n"
        f"Same budget for all: {config.num_steps} steps x {config.global_batch_size} images, arch {config.arch}, "
        f"{num_seeds} seed(s) from {config.seed} (mean ± std over seeds). Val grids; the label set is every digit "
        "present. F1, LRAP, mAP and top-1 in %, coverage in labels per image. F1@matched: the threshold (sigmoid) "
        "or top-m (softmax) whose mean set size equals the mean true set size (θ or m in the next column); top-T F1: "
        "each image's |T| best labels. Settings chosen on the tune split (docs/TUNING.md).\n\n"
    )
    (out_root / "table.md").write_text(header + markdown_table(rows))
    with open(out_root / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# -- the plots ------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_f1_curves(out_root: Path, methods: tuple[str, ...]) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for method in methods:
        evals = [r for r in read_metrics(out_root / method / "metrics.jsonl") if r.get("kind") == "eval"]
        axis.plot([r["step"] for r in evals], [100 * r["f1@0.25"] for r in evals], marker="o", label=method)
    axis.set_xlabel("training step")
    axis.set_ylabel("val F1@0.25 (%)")
    axis.set_title("Multi-label digit grid")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_root / "f1_curve.png", dpi=120)
    plt.close(figure)


def plot_f1_vs_coverage(out_root: Path, curves: dict[str, list[dict[str, float]]], trivial: dict[str, dict[str, float]]) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for method, points in curves.items():
        axis.plot([p["coverage"] for p in points], [100 * p["f1"] for p in points], marker=".", label=method)
    for name, scores in trivial.items():
        axis.scatter([scores["coverage"]], [100 * scores["f1"]], marker="x", color="black")
        axis.annotate(name.replace("_", " "), (scores["coverage"], 100 * scores["f1"]), fontsize=7, xytext=(4, -10), textcoords="offset points")
    axis.set_xscale("log")
    axis.set_xlabel("label coverage (mean predicted labels per image, log scale)")
    axis.set_ylabel("val F1 (%)")
    axis.set_title("F1 against coverage as the prediction set grows")
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_root / "f1_vs_coverage.png", dpi=120)
    plt.close(figure)


def score_final_models(out_root: Path, methods: tuple[str, ...]) -> tuple[dict[str, list[dict[str, float]]], dict[str, dict[str, float]]]:
    """F1-vs-coverage curves of each method's first-seed model, and the trivial predictors' scores."""
    from engine.scoring import eval_outputs

    curves, trivial = {}, {}
    for method in methods:
        outputs = eval_outputs(out_root / method)
        kind = "softmax" if method == "softmax" else "sigmoid"
        curves[method] = coverage_curve(outputs.logits, outputs.targets, kind, CURVE_THETAS)
        if not trivial:
            trivial = trivial_predictor_scores(outputs.labels, outputs.targets, outputs.logits.shape[1], TRIVIAL_K_RANDOM)
    return curves, trivial


# -- the command ----------------------------------------------------------------------------


def main(
    config: Path = typer.Option(None, "--config", help="Experiment config for every method (default: engine/configs/digits_grid.toml with each method's tuned settings from engine/configs/demo/methods.toml)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the runs, the table and the plots."),
    steps: int = typer.Option(None, "--steps", min=1, help="Override the step budget (all methods)."),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Train every method with N seeds (config seed, +1, ...); the table shows mean ± std."),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda."),
) -> None:
    """Train softmax, sigmoid and MILe on the digit grid with one budget and print the comparison table."""
    from engine.cli import default_config_path

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    base = load_toml(config or default_config_path())
    overrides = {"num_steps": steps, "device": device}
    settings = default_method_settings() if config is None else {}  # a user's --config is taken as it is
    configs = {m: [method_config(base, m, out, overrides, i, settings) for i in range(seeds)] for m in METHODS}  # all checked before any training
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, list[dict[str, Any]]] = {}
    for method, runs in configs.items():
        print(f"== {method} ==")
        summaries[method] = [run_method(c) for c in runs]
    curves, trivial = score_final_models(out, METHODS)
    rows = method_rows(summaries)
    write_table(out, rows + trivial_rows(trivial, list(rows[0])), configs["mile"][0], seeds)
    plot_f1_curves(out, METHODS)
    plot_f1_vs_coverage(out, curves, trivial)
    (out / "summaries.json").write_text(json.dumps({"runs": summaries, "curves": curves, "trivial": trivial}, indent=1) + "\n")
    print((out / "table.md").read_text())  # plain Markdown: wide tables stay readable in any terminal
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'f1_curve.png'}, {out / 'f1_vs_coverage.png'}")


def cli() -> None:
    from engine.config import ConfigError
    from engine.trainer import RunInterrupted

    try:
        typer.run(main)
    except RunInterrupted as stopped:
        typer.secho(f"{stopped}\nRun `make demo` again to continue where it stopped.", fg=typer.colors.YELLOW, err=True)
        raise SystemExit(stopped.exit_code) from None
    except (RunFolderError, ConfigError) as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
