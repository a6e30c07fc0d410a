"""Human-facing output: a run's metrics table, and the comparison report of many runs.

The report (``tools/report.py RUNS... --out DIR``, and the demo's and sweeps' own tables) reads run
folders only: ``config.toml``, ``summary.json``, ``metrics.jsonl``, ``demo_wall_s.json`` and, for the
F1-vs-coverage curve and the no-model rows, the last checkpoint scored on the run's eval split. It
writes ``table.md`` and ``table.csv`` (one row per group of runs, each cell the mean ± std over the
group's seeds), ``f1_curve.png`` (or ``METRIC_curve.png``: an eval metric over training) and
``f1_vs_coverage.png``, and for MILe runs with ``phase_eval`` records ``phases.png`` / ``phases.csv``
(the learner at the end of every teacher and student phase). Runs are grouped by every config key
that tells experiments apart (not the seed, the folder, the device or logging intervals), or by the
keys ``--group-by`` names.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from engine.config import ConfigError, RunConfig, flatten, key_by_name
from engine.run_folder import CONFIG_NAME, RunFolder, RunFolderError, saved_config

METHOD_ORDER = ("softmax", "sigmoid", "mile")
# (column title, summary key, scale): F1-like values in %, set sizes as they are
TABLE_COLUMNS = (
    ("F1@0.25", "f1@0.25", 100),
    ("F1@0.5", "f1@0.5", 100),
    ("coverage@0.25", "coverage@0.25", 1),
    ("F1@matched", "f1@matched", 100),
    ("θ or m @matched", "threshold@matched", 1),
    ("top-T F1", "f1@top|T|", 100),
    ("LRAP", "lrap", 100),
    ("secondary mAP", "secondary_map", 100),
    ("top-1", "top1", 100),
)
PAPER_F1_025 = {"softmax": 28.69, "sigmoid": 29.10, "mile": 41.35}  # poster, multi-label MNIST table
CURVE_THETAS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
TRIVIAL_K_RANDOM = (1, 2)
# Keys that do not make another experiment: where and how a run was executed and logged.
NOT_GROUPED = frozenset(
    {
        "seed",
        "out_dir",
        "device",
        "cuda_graphs",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "data.num_workers",
        "data.verify_data",
        "data.extra_eval",
        "checkpoint.keep_last",
        "checkpoint.best_metric",
    }
)
# Set sizes, thresholds and counts are shown as they are; every other metric in %.
_UNSCALED = re.compile(
    r"(^|/)(num_.*|coverage@.*|theta@matched|m@matched|threshold@matched|matched_target|eval_seconds|pseudo_set_size)$"
)


def print_metrics_table(summary: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        elif isinstance(value, (int, str)):
            table.add_row(key, str(value))
    Console().print(table)


# -- reading run folders -------------------------------------------------------------------


@dataclass
class RunRecord:
    """What a run folder holds: its config, its summary (None: the run did not finish), its wall time."""

    folder: Path
    config: RunConfig
    summary: dict[str, Any] | None
    wall_s: float | None

    @property
    def values(self) -> dict[str, Any]:
        return flatten(self.config.to_json(), str(self.folder / CONFIG_NAME))

    def last_step(self) -> int:
        return max((r.get("step", 0) for r in RunFolder(self.folder).read_metrics()), default=0)


def read_run(folder: Path) -> RunRecord:
    run = RunFolder(folder)
    return RunRecord(folder, saved_config(folder), run.read_summary(), run.read_wall_s())


def find_runs(paths: list[Path]) -> list[RunRecord]:
    """The runs named: a run folder (with config.toml), or a folder holding run folders at any depth
    (a demo's or a sweep's --out); anything else is an error naming the path."""
    folders: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise RunFolderError(f"{path} {'is not a folder' if path.exists() else 'does not exist'}: give run folders")
        if (path / CONFIG_NAME).is_file():
            folders.append(path)
            continue
        found = sorted(config.parent for config in path.rglob(CONFIG_NAME))
        if not found:
            raise RunFolderError(
                f"{path} is not a run folder (no {CONFIG_NAME}) and holds none: "
                "give the --out of engine-run, the demo or a sweep"
            )
        folders.extend(found)
    return [read_run(folder) for folder in dict.fromkeys(folders)]


# -- grouping --------------------------------------------------------------------------------


@dataclass
class Group:
    """Runs of one experiment (seeds apart); ``label`` names it in the table and the plots."""

    label: str
    method: str
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def first(self) -> RunRecord:
        """The run of the lowest seed: the one whose curves are plotted."""
        return self.runs[0]


def grouping_keys(runs: list[RunRecord], group_by: list[str] | None) -> list[str]:
    """``group_by`` (checked; ``method`` = ``method.name``), else every key whose value differs between runs."""
    known = key_by_name()
    if group_by:
        names = ["method.name" if name == "method" else name for name in group_by]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ConfigError(f"--group-by {', '.join(unknown)}: not a config key (engine-run --help lists them)")
        return names
    values = [run.values for run in runs]
    return [name for name in known if name not in NOT_GROUPED and len({json.dumps(v[name]) for v in values}) > 1]


def group_runs(runs: list[RunRecord], group_by: list[str] | None = None) -> list[Group]:
    """Groups of runs with equal values of the grouping keys, ordered softmax, sigmoid, MILe, then by label."""
    keys = grouping_keys(runs, group_by)
    by_values: dict[str, list[RunRecord]] = {}
    for run in runs:
        by_values.setdefault(json.dumps([run.values[k] for k in keys]), []).append(run)
    groups = [
        Group(
            _label(members, runs, keys), _method(members), sorted(members, key=lambda r: (r.config.seed, str(r.folder)))
        )
        for members in by_values.values()
    ]
    order = {method: index for index, method in enumerate(METHOD_ORDER)}
    return sorted(groups, key=lambda g: (order.get(g.method, len(order)), g.label))


def _method(members: list[RunRecord]) -> str:
    methods = {run.config.method.name.value for run in members}
    return methods.pop() if len(methods) == 1 else "mixed"


def _label(members: list[RunRecord], runs: list[RunRecord], keys: list[str]) -> str:
    """The group's method (when its runs share one) and the grouping keys that tell it apart from the
    other groups of that method: "mile rho=0.1"."""
    method = _method(members)
    peers = [r for r in runs if r.config.method.name.value == method] if method != "mixed" else runs
    telling = [k for k in keys if k != "method.name" and len({json.dumps(r.values[k]) for r in peers}) > 1]
    words = ([method] if method != "mixed" else []) + [
        f"{k.rpartition('.')[2]}={members[0].values[k]}" for k in telling
    ]
    return " ".join(words) or "all runs"


# -- the table -------------------------------------------------------------------------------


def _value(summary: dict[str, Any], key: str) -> float | None:
    if key == "threshold@matched":  # sigmoid models report a threshold, softmax models a set size m
        return summary.get("theta@matched", summary.get("m@matched"))
    return summary.get(key)


def _cell(values: list[float], spec: str = ".2f") -> str:
    if len(values) == 1:
        return f"{values[0]:{spec}}"
    return f"{statistics.mean(values):{spec}} ± {statistics.stdev(values):{spec}}"


def metric_columns(metrics: list[str] | None, summaries: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """``--metrics`` as columns (title = key), or the demo's columns followed by each extra eval set's top-1."""
    if metrics:
        return [(name, name, 1 if _UNSCALED.search(name) else 100) for name in metrics]
    extra_sets = dict.fromkeys(k.rpartition("/")[0] for s in summaries for k in s if "/" in k and k.endswith("/top1"))
    return [*TABLE_COLUMNS, *((f"{name} top-1", f"{name}/top1", 100) for name in extra_sets)]


def group_rows(groups: list[Group], columns: list[tuple[str, str, int]], paper: bool) -> list[dict[str, str]]:
    """One row per group of finished runs: each cell the mean ± standard deviation over its seeds."""
    rows = []
    for group in groups:
        summaries = [run.summary for run in group.runs if run.summary is not None]
        if not summaries:
            continue
        row = {"method": group.label, "seeds": str(len(summaries))}
        for title, key, scale in columns:
            values = [_value(s, key) for s in summaries]
            spec = ".3g" if key == "threshold@matched" else ".2f"  # thresholds near 0.01 need significant digits
            present = [v for v in values if v is not None]
            row[title] = _cell([scale * v for v in present], spec) if len(present) == len(values) else "-"
        if paper:
            row["paper F1@0.25"] = f"{PAPER_F1_025[group.method]:.2f}" if group.method in PAPER_F1_025 else "-"
        walls = [run.wall_s for run in group.runs if run.summary is not None and run.wall_s is not None]
        row["wall s"] = f"{sum(walls):.0f}" if walls else "-"
        rows.append(row)
    return rows


def drop_empty_columns(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Columns no row has a value in (F1 on a single-label split, wall time of plain engine-run runs) go."""
    if not rows:
        return rows
    kept = [c for c in rows[0] if c in ("method", "seeds") or any(row[c] != "-" for row in rows)]
    return [{c: row[c] for c in kept} for row in rows]


def trivial_rows(trivial: dict[str, dict[str, float]], columns: list[str]) -> list[dict[str, str]]:
    """Predictors without a model (the given label, plus k random classes, every class), so a reader
    sees what a number means: their F1 needs no threshold, so it fills the F1@theta columns."""
    rows = []
    for name, scores in trivial.items():
        row = {column: "-" for column in columns}
        row["method"] = f"no model: {name.replace('_', ' ')}"
        for title in ("F1@0.25", "F1@0.5"):
            if title in row:
                row[title] = f"{100 * scores['f1']:.2f}"
        if "coverage@0.25" in row:
            row["coverage@0.25"] = f"{scores['coverage']:.2f}"
        if "f1@top|T|" in scores and "top-T F1" in row:
            row["top-T F1"] = f"{100 * scores['f1@top|T|']:.2f}"
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def on_digit_grid(run: RunRecord) -> bool:
    """The run trained on a digit grid (the embedded one, or one converted by make-shards digits-grid)."""
    if not run.config.data.root:
        return True
    from shards.manifest import ShardError, load_split

    try:
        return load_split(Path(run.config.data.root), run.config.data.train_split).extra.get("source") == "digits-grid"
    except ShardError:  # the data moved away: the report still stands, without the paper's figures
        return False


def table_header(groups: list[Group], digit_grid: bool) -> str:
    """What the table compares, from the runs' configs: data, budget, seeds, the metrics' units."""
    runs = [run for group in groups for run in group.runs if run.summary is not None]
    config = runs[0].config
    data = "Multi-label digit grid" if digit_grid else (Path(config.data.root).name or config.data.root)
    title = f"# {data}: {' vs '.join(group.label for group in groups if any(r.summary for r in group.runs))}\n\n"
    budgets = {(r.config.num_steps, r.config.global_batch_size, r.config.arch) for r in runs}
    budget = (
        f"Same budget for all: {config.num_steps} steps x {config.global_batch_size} images, arch {config.arch}"
        if len(budgets) == 1
        else "Budgets differ (each run's config.toml has its own)"
    )
    seeds = sorted({r.config.seed for r in runs})
    evaluated = sorted({r.config.data.eval_split for r in runs})
    return title + (
        f"{budget}; seeds {', '.join(map(str, seeds))} (mean ± std over a row's seeds). "
        f"Eval split {', '.join(evaluated)}{'; the label set is every digit present' if digit_grid else ''}. "
        "F1, LRAP, mAP and top-1 in %, coverage in labels per image. F1@matched: the threshold (sigmoid) or "
        "top-m (softmax) whose mean set size equals the mean true set size "
        "(θ or m in the next column); top-T F1: each image's |T| best labels.\n\n"
    )


def unfinished_note(runs: list[RunRecord]) -> str:
    unfinished = [run for run in runs if run.summary is None]
    if not unfinished:
        return ""
    listed = "; ".join(f"{run.folder} (step {run.last_step()} of {run.config.num_steps})" for run in unfinished)
    return f"\nUnfinished runs (no summary.json; not in the table): {listed}.\n"


def write_table(out: Path, rows: list[dict[str, str]], header: str, note: str) -> None:
    (out / "table.md").write_text(header + (markdown_table(rows) if rows else "No finished runs.\n") + note)
    with open(out / "table.csv", "w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


# -- the plots ------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def curve_file(metric: str) -> str:
    """f1_curve.png for F1@0.25 (the demo's name), else the metric's name made a file name."""
    return "f1_curve.png" if metric == "f1@0.25" else re.sub(r"[^A-Za-z0-9.@-]+", "_", metric) + "_curve.png"


# A metric's name in words, for plot titles and axes; "@X" adds "at threshold X" (docs/DESIGN.md, "Metrics").
_METRIC_WORDS = {
    "top1": "top-1 accuracy",
    "top5": "top-5 accuracy",
    "real_top1": "top-1 against the label sets",
    "f1": "F1 of the label sets",
    "coverage": "labels predicted per image",
    "balanced_acc": "balanced accuracy",
    "secondary_map": "secondary-label mAP",
    "lrap": "label ranking average precision",
    "f1@top|T|": "F1 of each image's |T| best labels",
    "f1@matched": "F1 at the matched set size",
    "coverage@matched": "labels predicted per image at the matched set size",
    "theta@matched": "threshold giving the matched set size",
    "m@matched": "top-m giving the matched set size",
    "num_images": "images evaluated",
    "pseudo_set_size": "pseudo-labels per image",
    "pseudo_empty_fraction": "images with no pseudo-label",
    "pseudo_precision": "pseudo-labels that are true",
    "pseudo_recall": "true labels that are pseudo-labels",
}


def metric_words(metric: str) -> str:
    """``f1@0.25`` -> "F1 of the label sets at threshold 0.25";
    ``imagenet/val/top1`` -> "top-1 accuracy on imagenet/val"."""
    where, _, name = metric.rpartition("/")
    if name in _METRIC_WORDS:
        words = _METRIC_WORDS[name]
    else:
        base, at, theta = name.partition("@")
        words = f"{_METRIC_WORDS.get(base, base)} at threshold {theta}" if at else _METRIC_WORDS.get(name, name)
    return f"{words} on {where}" if where else words


def phase_spans(config: RunConfig) -> list[tuple[str, int, int]]:
    """(phase, first step, end step) of every phase of a run, in steps done (an eval point's x)."""
    from engine.phases import TEACHER, PhasePlan

    method, plan, spans, start = config.method, PhasePlan(config.method), [], 0
    while start < config.num_steps:
        position = plan.position(start)
        if position.phase is TEACHER:
            length = method.k_teacher_steps + (method.warmup_steps if position.cycle == 0 else 0)
        else:
            length = method.k_student_steps
        end = min(config.num_steps, start + max(1, length - position.step_in_phase))
        spans.append((position.phase.value, start, end))
        start = end
    return spans


def shade_phases(axis: Any, config: RunConfig) -> None:
    """MILe's imitation (student) phases shaded, interaction (teacher) phases left clear; one legend entry."""
    students = [(start, end) for phase, start, end in phase_spans(config) if phase == "student"]
    for index, (start, end) in enumerate(students):
        label = "MILe imitation (student) phases" if index == 0 else None
        axis.axvspan(start, end, color="tab:purple", alpha=0.12, linewidth=0, label=label)


def plot_metric_curves(out: Path, groups: list[Group], metric: str, title: str) -> Path:
    """``metric`` at every eval point of each group's first run (its lowest seed); the imitation phases
    of the first MILe group shaded."""
    plt = _pyplot()
    scale = 1 if _UNSCALED.search(metric) else 100
    figure, axis = plt.subplots(figsize=(7, 4.2))
    mile = next((group for group in groups if group.method == "mile"), None)
    if mile is not None:
        shade_phases(axis, mile.first.config)
    for group in groups:
        records = RunFolder(group.first.folder).read_metrics()
        evals = [r for r in records if r.get("kind") == "eval" and r.get(metric) is not None]
        axis.plot([r["step"] for r in evals], [scale * r[metric] for r in evals], marker="o", label=group.label)
    last_step = max([group.first.config.num_steps for group in groups] + [int(axis.get_xlim()[1]), 1])
    axis.set_xlim(0, last_step * 1.02)  # the whole run, from step 0
    axis.set_xlabel("training step")
    axis.set_ylabel(f"{metric_words(metric)}{' (%)' if scale == 100 else ''}")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    figure.savefig(out / curve_file(metric), dpi=120)
    plt.close(figure)
    return out / curve_file(metric)


def plain_log_ticks(axis: Any) -> None:
    """A log-scale x axis labelled 0.5, 1, 2, 5, 10 (not 2×10⁰); every 1..9 multiple where the axis
    spans less than a factor 4 (a narrow coverage range would otherwise have one label or none)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def label(value: float, _position: int) -> str:
        low, high = axis.get_xlim()
        leading = round(value / 10 ** math.floor(math.log10(value)), 6) if value > 0 else 0
        return f"{value:g}" if leading in (1, 2, 5) or (low > 0 and high / low < 4) else ""

    axis.xaxis.set_major_locator(LogLocator(base=10, subs=tuple(float(k) for k in range(1, 10))))
    axis.xaxis.set_major_formatter(FuncFormatter(label))
    axis.xaxis.set_minor_formatter(NullFormatter())


def plot_f1_vs_coverage(
    out: Path, curves: dict[str, list[dict[str, float | str]]], trivial: dict[str, dict[str, float]]
) -> Path:
    """Each model's F1 against its label coverage as theta falls; the no-model predictors as marks
    named in the legend (outside the axes), so that no text covers a curve."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for label, points in curves.items():
        axis.plot([p["coverage"] for p in points], [100 * p["f1"] for p in points], marker=".", label=label)
    for (name, scores), marker in zip(trivial.items(), "xP*Dv^<>"):
        axis.scatter(
            [scores["coverage"]],
            [100 * scores["f1"]],
            marker=marker,
            color="black",
            label=f"no model: {name.replace('_', ' ')}",
        )
    axis.set_xscale("log")
    plain_log_ticks(axis)
    axis.set_xlabel("label coverage: mean labels predicted per image (log scale)")
    axis.set_ylabel("F1 of the label sets (%)")
    axis.set_title("F1 against coverage as the threshold falls and the label sets grow", fontsize=10)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    figure.savefig(out / "f1_vs_coverage.png", dpi=120)
    plt.close(figure)
    return out / "f1_vs_coverage.png"


# -- MILe's phases: the learner at every phase end -----------------------------------------------

# phases.png's panels, in order; a panel whose metric no record has is left out (pseudo_precision
# needs an eval split with label sets)
PHASE_PANELS = ("top1", "lrap", "f1@top|T|", "f1@matched", "pseudo_set_size", "pseudo_precision")
PHASE_FIELDS = ("group", "step", "role", "cycle", "seeds")
_NOT_METRICS = frozenset({"kind", "step", "role", "cycle"})
# role -> (line style, marker, legend words)
_ROLE_STYLE: dict[str, tuple[Literal["-", "--"], str, str]] = {
    "teacher": ("-", "o", "teacher: end of an interaction phase"),
    "student": ("--", "s", "student: end of an imitation phase"),
}


def _phase_records(run: RunRecord) -> dict[tuple[int, str, int], dict[str, Any]]:
    """A run's ``phase_eval`` records (docs/METRICS.md) by (step, role, cycle); none for other runs."""
    records = RunFolder(run.folder).read_metrics()
    return {(r["step"], r["role"], r["cycle"]): r for r in records if r.get("kind") == "phase_eval"}


def _mean_or_none(values: list[Any]) -> float | int | None:
    """The mean of the finite numbers in ``values``; a count stays an integer where it is one."""
    present = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not present:
        return None
    mean = statistics.fmean(present)
    return int(mean) if all(isinstance(v, int) for v in present) and mean.is_integer() else mean


def phase_rows(groups: list[Group]) -> list[dict[str, Any]]:
    """One row per MILe group and phase end: group, step, role, cycle, seeds (the group's runs that
    reached it) and every metric of its ``phase_eval`` records, averaged over those runs (None where
    no run has a finite value). Groups without such records (baselines, older runs) give no row."""
    rows: list[dict[str, Any]] = []
    for group in groups:
        if group.method != "mile":
            continue
        ends: dict[tuple[int, str, int], list[dict[str, Any]]] = {}
        for run in group.runs:
            for key, record in _phase_records(run).items():
                ends.setdefault(key, []).append(record)
        for (step, role, cycle), records in sorted(ends.items()):
            names = dict.fromkeys(name for record in records for name in record if name not in _NOT_METRICS)
            row: dict[str, Any] = {"group": group.label, "step": step, "role": role, "cycle": cycle}
            row["seeds"] = len(records)
            rows.append(row | {name: _mean_or_none([r.get(name) for r in records]) for name in names})
    return rows


def write_phase_csv(out: Path, rows: list[dict[str, Any]]) -> Path:
    """``phases.csv``: ``phase_rows`` as they are (fractions, not %), an empty cell for None."""
    fields = list(dict.fromkeys(name for row in rows for name in row))
    with open(out / "phases.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows([{k: ("" if v is None else v) for k, v in row.items()} for row in rows])
    return out / "phases.csv"


def plot_phases(out: Path, rows: list[dict[str, Any]], title: str) -> Path:
    """``phases.png``: one panel per metric of PHASE_PANELS over training steps; teacher and student
    points in two line styles, one colour per MILe group; the legend beside the panels."""
    plt = _pyplot()
    panels = [m for m in PHASE_PANELS if any(row.get(m) is not None for row in rows)]
    columns = 2
    figure, axes = plt.subplots(
        math.ceil(len(panels) / columns), columns, figsize=(12.5, 2.9 * math.ceil(len(panels) / columns)), squeeze=False
    )
    labels = list(dict.fromkeys(row["group"] for row in rows))
    colours = {label: f"C{index % 10}" for index, label in enumerate(labels)}
    for axis, metric in zip(axes.flat, panels):
        _phase_panel(axis, rows, metric, colours)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    handles = _phase_legend(plt, colours)
    figure.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(0.75, 0.95), borderaxespad=0)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0, 0.74, 0.97))
    figure.savefig(out / "phases.png", dpi=120, bbox_inches="tight")  # a long group label is never cut off
    plt.close(figure)
    return out / "phases.png"


def _phase_panel(axis: Any, rows: list[dict[str, Any]], metric: str, colours: dict[str, str]) -> None:
    scale = 1 if _UNSCALED.search(metric) else 100
    for label, colour in colours.items():
        for role, (line, marker, _) in _ROLE_STYLE.items():
            points = [r for r in rows if r["group"] == label and r["role"] == role and r.get(metric) is not None]
            steps, values = [r["step"] for r in points], [scale * r[metric] for r in points]
            axis.plot(steps, values, linestyle=line, marker=marker, color=colour, markersize=4)
    axis.set_title(f"{metric_words(metric)}{' (%)' if scale == 100 else ''}", fontsize=9)
    axis.set_xlabel("training step", fontsize=8)
    axis.ticklabel_format(style="plain", useOffset=False)
    axis.tick_params(labelsize=8)
    axis.grid(alpha=0.3)


def _phase_legend(plt: Any, colours: dict[str, str]) -> list[Any]:
    """One entry per group (its colour) and one per role (its line style and marker, in grey)."""
    from matplotlib.lines import Line2D

    groups = [Line2D([], [], color=colour, linewidth=2, label=label) for label, colour in colours.items()]
    roles = [
        Line2D([], [], color="0.35", linestyle=line, marker=marker, markersize=4, label=words)
        for line, marker, words in _ROLE_STYLE.values()
    ]
    return groups + roles


def write_phase_report(out: Path, groups: list[Group], data: str) -> list[Path]:
    """``phases.png`` and ``phases.csv`` of the MILe groups with ``phase_eval`` records; nothing when none has."""
    rows = phase_rows(groups)
    if not rows:
        return []
    title = f"{data}: MILe's learner at the end of every phase (mean over seeds)"
    return [plot_phases(out, rows, title), write_phase_csv(out, rows)]


def score_final_models(
    groups: list[Group],
) -> tuple[dict[str, list[dict[str, float | str]]], dict[str, dict[str, float]]]:
    """F1-vs-coverage curves of each group's first finished run (its last checkpoint on its eval split),
    and the no-model predictors' scores on that split; empty where the split has no multi-label sets."""
    from engine.metrics import coverage_curve, trivial_predictor_scores
    from engine.scoring import eval_outputs

    curves: dict[str, list[dict[str, float | str]]] = {}
    trivial: dict[str, dict[str, float]] = {}
    for group in groups:
        run = next(
            (r for r in group.runs if r.summary is not None and RunFolder(r.folder).checkpoint_path.is_file()), None
        )
        if run is None:
            continue
        outputs = eval_outputs(run.folder)
        if outputs.targets is None:
            continue
        curves[group.label] = coverage_curve(outputs.logits, outputs.targets, run.config.method.name.kind, CURVE_THETAS)
        if not trivial:
            trivial = trivial_predictor_scores(
                outputs.labels, outputs.targets, outputs.logits.shape[1], TRIVIAL_K_RANDOM
            )
    return curves, trivial


# -- the whole report --------------------------------------------------------------------------


@dataclass
class Report:
    groups: list[Group]
    rows: list[dict[str, str]]
    curves: dict[str, list[dict[str, float | str]]]
    trivial: dict[str, dict[str, float]]
    files: list[Path]


def write_report(
    out: Path,
    runs: list[RunRecord],
    metrics: list[str] | None = None,
    group_by: list[str] | None = None,
    curve_metric: str | None = None,
    score_models: bool = True,
) -> Report:
    """``table.md``, ``table.csv`` and the plots of ``runs`` in ``out``; what they show."""
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs, group_by)
    finished = [run for run in runs if run.summary is not None]
    summaries = [run.summary for run in runs if run.summary is not None]
    if not finished:
        write_table(out, [], "# No finished runs\n\n", unfinished_note(runs))
        return Report(groups, [], {}, {}, [out / "table.md", out / "table.csv"])
    digit_grid = all(on_digit_grid(run) for run in finished)
    columns = metric_columns(metrics, summaries)
    rows = drop_empty_columns(group_rows(groups, columns, paper=digit_grid))
    curves, trivial = score_final_models(groups) if score_models else ({}, {})
    table_rows = rows + trivial_rows(trivial, list(rows[0])) if metrics is None else rows
    write_table(out, table_rows, table_header(groups, digit_grid), unfinished_note(runs))
    files = [out / "table.md", out / "table.csv"]
    metric = curve_metric or ("f1@0.25" if "f1@0.25" in summaries[0] else "top1")
    data = "Multi-label digit grid" if digit_grid else (Path(finished[0].config.data.root).name or "data")
    files.append(plot_metric_curves(out, groups, metric, f"{data}: {metric_words(metric)} over training"))
    if curves:
        files.append(plot_f1_vs_coverage(out, curves, trivial))
    files += write_phase_report(out, groups, data)
    return Report(groups, table_rows, curves, trivial, files)
