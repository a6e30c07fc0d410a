"""The main job (``make demo``): the paper's multi-label grid experiment, softmax vs sigmoid vs MILe.

All three methods train from ``engine/configs/digits_grid.toml`` with the same budget and seed;
only ``[method].name`` changes. Writes ``runs/demo/table.md``, ``table.csv`` and ``f1_curve.png``
(F1@0.25 on the val grids over training steps) and prints the table. Running it again reuses
finished runs of the same config and resumes interrupted ones; it never deletes a run.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import typer

from engine.config import RunConfig, build_config, load_toml
from engine.run_folder import CONFIG_NAME, RunFolderError, read_metrics, saved_config

METHODS = ("softmax", "sigmoid", "mile")
TABLE_COLUMNS = (("F1@0.25", "f1@0.25"), ("F1@0.5", "f1@0.5"), ("coverage@0.25", "coverage@0.25"), ("top-1", "top1"))
PAPER_F1_025 = {"softmax": 28.69, "sigmoid": 29.10, "mile": 41.35}  # poster, multi-label MNIST table


def method_config(base: dict[str, Any], method: str, out_root: Path, overrides: dict[str, Any]) -> RunConfig:
    return build_config(base, {**overrides, "method.name": method, "out_dir": str(out_root / method)})


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


def table_rows(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for method, summary in summaries.items():
        row: dict[str, Any] = {"method": method}
        for title, key in TABLE_COLUMNS:
            value = summary[key]
            row[title] = value if key.startswith("coverage") else 100.0 * value
        row["paper F1@0.25"] = PAPER_F1_025[method]
        row["wall s"] = summary["wall_s"] if summary["wall_s"] is not None else "-"
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out_root: Path, rows: list[dict[str, Any]], config: RunConfig) -> None:
    header = (
        "# Multi-label digit grid: softmax vs sigmoid vs MILe\n\n"
        f"Same budget for all: {config.num_steps} steps x {config.global_batch_size} images, arch {config.arch}, "
        f"seed {config.seed}. F1/top-1 in %, coverage in labels per image; val grids (every digit present = label set).\n\n"
    )
    (out_root / "table.md").write_text(header + markdown_table(rows))
    with open(out_root / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_f1_curves(out_root, METHODS)


def plot_f1_curves(out_root: Path, methods: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

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


def main(
    config: Path = typer.Option(None, "--config", help="Experiment config (default: engine/configs/digits_grid.toml)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the three runs and the table."),
    steps: int = typer.Option(None, "--steps", help="Override the step budget (all methods)."),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda."),
) -> None:
    """Train softmax, sigmoid and MILe on the digit grid with one budget and print the paper's table."""
    from engine.cli import default_config_path
    from engine.report import print_markdown

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    base = load_toml(config or default_config_path())
    overrides = {"num_steps": steps, "device": device}
    out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for method in METHODS:
        print(f"== {method} ==")
        summaries[method] = run_method(method_config(base, method, out, overrides))
    rows = table_rows(summaries)
    write_outputs(out, rows, method_config(base, "mile", out, overrides))
    (out / "summaries.json").write_text(json.dumps(summaries, indent=1) + "\n")
    print_markdown((out / "table.md").read_text())
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'f1_curve.png'}")


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
