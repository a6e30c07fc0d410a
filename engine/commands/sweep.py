"""Sweeps: a grid of run configs from one TOML file, each a separate resumable run, and a table.

A sweep file names a base config, overrides applied to every run, and per method a grid::

    base = "digits_grid.toml"          # relative to the sweep file, or a packaged config name
    select_by = "lrap"                 # the summary key that picks each method's best run
    [overrides]
    "data.eval_split" = "tune"
    [grid.mile]
    "optim.lr_per_256" = [0.1, 0.2]
    "method.k_teacher_steps,method.k_student_steps" = [[50, 50], [100, 100]]   # tied values

Every combination of a method's grid is one run in ``OUT/METHOD/NAME``; finished runs are reused
and interrupted ones resumed (``engine.runs.train_or_reuse``), so a sweep can be stopped and re-run.
NAME is built from the grid's values and kept inside OUT whatever they hold (``run_folder_name``):
characters other than letters, digits and ``._=,+-`` become ``_`` (a ``/`` or ``..`` cannot climb
out) and a name so changed, or too long, ends in a hash of the original, so that two runs never share one.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import (
    ConfigError,
    Method,
    RunConfig,
    build_config,
    flatten,
    key_by_name,
    load_toml,
    packaged_config,
    read_toml,
)
from engine.runs import train_or_reuse

_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
MAX_NAME_CHARS = 120  # well under any file system's 255-byte limit on a name


def run_folder_name(raw: str) -> str:
    """``raw`` as one path component that stays inside its parent (module docstring)."""
    name = _UNSAFE.sub("_", raw)
    if name.strip(".") == "":
        name = name.replace(".", "_")  # "." and ".." name the folder itself or its parent
    if name == raw and len(name) <= MAX_NAME_CHARS:
        return name
    tag = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{name[: MAX_NAME_CHARS - len(tag) - 1]}-{tag}"


def _run_dir(out_root: Path, method: str, name: str, source: str) -> Path:
    """``OUT/METHOD/NAME``, checked to lie inside ``out_root``."""
    folder = out_root / run_folder_name(method) / name
    root = out_root.resolve()
    if root not in folder.resolve().parents:
        raise ConfigError(f"{source}: the run folder of [grid.{method}] {name!r} would lie outside --out {out_root}")
    return folder


@dataclass(frozen=True)
class SweepRun:
    method: str
    name: str  # "lr_per_256=0.2,rho=0.1": the run's folder name
    overrides: dict[str, Any]
    config: RunConfig


def _combinations(grid: dict[str, list[Any]], source: str) -> list[dict[str, Any]]:
    """Cartesian product of the grid; a key "a,b" takes tied values from [[a1, b1], [a2, b2]]."""
    axes = []
    for joined, values in grid.items():
        names = joined.split(",")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: grid {joined!r} must be a non-empty list")
        rows = [v if len(names) > 1 else [v] for v in values]
        if any(not isinstance(r, list) or len(r) != len(names) for r in rows):
            raise ConfigError(f"{source}: grid {joined!r} needs lists of {len(names)} values")
        axes.append([dict(zip(names, row)) for row in rows])
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


SWEEP_KEYS = ("base", "select_by", "overrides", "grid")


def load_sweep(path: Path, out_root: Path) -> tuple[list[SweepRun], str]:
    """Every run of the sweep file (all configs checked before any trains) and its selection key;
    anything malformed is a ConfigError naming the file and the key."""
    path = Path(path)
    spec = _read_spec(path)
    base_name = spec.get("base", "digits_grid.toml")
    if not isinstance(base_name, str) or not base_name:
        raise ConfigError(f"{path}: base must be a config file name, got {base_name!r}")
    base_path = path.parent / base_name if (path.parent / base_name).is_file() else packaged_config(base_name)
    if not base_path.is_file():
        raise ConfigError(f"{path}: base {base_name!r} is neither a file beside it nor a packaged config")
    base = load_toml(base_path)
    common = flatten(_table(spec, "overrides", path), f"{path} [overrides]")
    runs: list[SweepRun] = []
    folders: dict[Path, str] = {}
    for method, grid in _table(spec, "grid", path).items():
        source = f"{path} [grid.{method}]"
        if method not in {m.value for m in Method}:
            raise ConfigError(f"{source}: {method!r} is not a method; one of {[m.value for m in Method]}")
        if not isinstance(grid, dict):
            raise ConfigError(f"{source} must be a table of key = [values], got {grid!r}")
        _check_grid_keys(grid, source)
        for combo in _combinations(grid, source):
            raw = ",".join(f"{k.rpartition('.')[2]}={v}" for k, v in combo.items()) or "default"
            name = run_folder_name(raw)
            out_dir = _run_dir(Path(out_root), method, name, str(path))
            if out_dir in folders:
                raise ConfigError(f"{source}: runs {folders[out_dir]!r} and {raw!r} would share the folder {out_dir}")
            folders[out_dir] = raw
            overrides = {**common, **combo, "method.name": method, "out_dir": str(out_dir)}
            try:
                config = build_config(base, overrides, source=str(path))
            except ConfigError as error:
                raise ConfigError(f"{source} run {raw}: {error}") from None
            runs.append(SweepRun(method, name, combo, config))
    if not runs:
        raise ConfigError(f"{path}: no [grid.METHOD] table")
    select_by = spec.get("select_by", "lrap")
    if not isinstance(select_by, str) or not select_by:
        raise ConfigError(f"{path}: select_by must be a metric name, got {select_by!r}")
    return runs, select_by


def _read_spec(path: Path) -> dict[str, Any]:
    spec = read_toml(path, "sweep file")
    unknown = [key for key in spec if key not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; a sweep file holds {', '.join(SWEEP_KEYS)}")
    return spec


def _table(spec: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    value = spec.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {name} must be a table ([{name}]), got {value!r}")
    return value


def _check_grid_keys(grid: dict[str, Any], source: str) -> None:
    known = key_by_name()
    for joined in grid:
        for name in joined.split(","):
            if name not in known:
                raise ConfigError(f"{source}: unknown config key {name!r} (engine-run --help lists every key)")
            if name in ("method.name", "out_dir"):
                raise ConfigError(f"{source}: {name!r} is set by the sweep (the grid's method, --out); not a grid key")


def check_select_by(select_by: str, runs: list[SweepRun], path: Path) -> None:
    """``select_by`` must be a score every run reports: checked from the data's manifests before any
    run trains, not found missing after all of them have."""
    from engine.plan import run_scores

    for run in runs:
        scores = run_scores(run.config)
        if select_by not in scores:
            raise ConfigError(
                f"{path}: select_by {select_by!r} is not a score run {run.method}/{run.name} reports; "
                f"one of {', '.join(scores)}"
            )


def run_sweep(runs: list[SweepRun]) -> list[dict[str, Any]]:
    results = []
    for index, run in enumerate(runs, start=1):
        print(f"== {index}/{len(runs)}: {run.method} {run.name} ==")
        results.append({"method": run.method, "run": run.name, **run.overrides, **train_or_reuse(run.config)})
    return results


def best_per_method(results: list[dict[str, Any]], select_by: str) -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for result in results:
        current = best.get(result["method"])
        if current is None or _score(result, select_by) > _score(current, select_by):
            best[result["method"]] = result
    return best


def _score(result: dict[str, Any], select_by: str) -> float:
    value = result.get(select_by)  # None: the metric was not finite (summary.json writes null)
    return float("-inf") if value is None else float(value)


def write_results(out_root: Path, results: list[dict[str, Any]], columns: list[str]) -> None:
    with open(out_root / "sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "run", *columns], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)


def results_markdown(results: list[dict[str, Any]], columns: list[str], select_by: str) -> str:
    best = {id(r) for r in best_per_method(results, select_by).values()}
    header = [c.replace("|", "\\|") for c in columns]  # a bare | would split a Markdown cell
    lines = ["| method | run | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(columns)]
    for r in results:
        cells = [
            f"{100 * r[c]:.2f}"
            if isinstance(r.get(c), float) and "coverage" not in c and "theta" not in c
            else (f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-")))
            for c in columns
        ]
        mark = " **(chosen)**" if id(r) in best else ""
        lines.append(f"| {r['method']} | {r['run']}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = [
    "SweepRun",
    "load_sweep",
    "check_select_by",
    "run_sweep",
    "best_per_method",
    "write_results",
    "results_markdown",
    "flatten",
]
