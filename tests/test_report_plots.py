"""tools/report.py's plots: titles and axes in words, plain coverage ticks, legends beside the axes
(no annotation over a curve), MILe's imitation phases shaded on the curve over steps; the trainer's
``phase_eval`` records at every MILe phase end and the report's phases.png / phases.csv of them."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import CPU, run_in_process, tiny_config

from engine.commands.report import metric_words, phase_spans, plain_log_ticks, plot_f1_vs_coverage
from engine.commands.run import resolve_config
from engine.config import to_toml
from engine.phases import PhasePlan
from engine.run_folder import read_metrics, saved_config
from engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
STEPS = 60


def fake_run(folder: Path, method: str) -> Path:
    """A finished run folder as engine-run leaves it (config, metrics, summary), without training."""
    overrides = {"method.name": method, "num_steps": STEPS, "out_dir": str(folder)}
    if method == "mile":
        overrides |= {"method.warmup_steps": 10, "method.k_teacher_steps": 10, "method.k_student_steps": 5}
    config, _ = resolve_config(None, False, overrides)
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(to_toml(config))
    records = []
    for step in range(5, STEPS + 1, 5):
        score = 0.2 + 0.5 * (1 - math.exp(-step / 20)) + (0.05 if method == "mile" else 0)
        records.append({"kind": "eval", "step": step, "phase": "train", "cycle": 0, "f1@0.25": score, "top1": score})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").write_text(json.dumps({"step": STEPS, "method": method, **records[-1]}))
    return folder


def test_report_plots_through_the_cli(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path / "runs" / method, method) for method in ("sigmoid", "mile")]
    command = [
        sys.executable,
        "tools/report.py",
        *map(str, runs),
        "--out",
        str(tmp_path / "report"),
        "--no-score-models",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report" / "f1_curve.png").stat().st_size > 10_000


def test_metric_names_read_as_words() -> None:
    assert metric_words("f1@0.25") == "F1 of the label sets at threshold 0.25"
    assert metric_words("top1") == "top-1 accuracy"
    assert metric_words("coverage@0.5") == "labels predicted per image at threshold 0.5"
    assert metric_words("imagenet/val/top1") == "top-1 accuracy on imagenet/val"
    assert metric_words("f1@top|T|") == "F1 of each image's |T| best labels"
    assert metric_words("pseudo_set_size") == "pseudo-labels per image"


def test_mile_phase_spans_follow_the_phase_plan(tmp_path: Path) -> None:
    config, _ = resolve_config(
        None,
        False,
        {
            "method.name": "mile",
            "num_steps": 47,
            "method.warmup_steps": 10,
            "method.k_teacher_steps": 10,
            "method.k_student_steps": 5,
        },
    )
    spans = phase_spans(config)
    assert spans[:4] == [("teacher", 0, 20), ("student", 20, 25), ("teacher", 25, 35), ("student", 35, 40)]
    assert spans[-1] == ("teacher", 40, 47)
    sigmoid, _ = resolve_config(None, False, {"method.name": "sigmoid", "num_steps": 47})
    assert phase_spans(sigmoid) == [("train", 0, 47)]


def test_coverage_axis_ticks_are_plain_numbers(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots()
    axis.plot([0.6, 1.5, 3.0, 9.0], [10, 20, 30, 25])
    axis.set_xscale("log")
    plain_log_ticks(axis)
    figure.canvas.draw()
    labels = [tick.get_text() for tick in axis.get_xticklabels() if tick.get_text()]
    plt.close(figure)
    assert labels and all("10^" not in label and "times" not in label for label in labels), labels
    assert {"1", "2", "5"} <= set(labels), labels

    curves: dict[str, list[dict[str, float | str]]]
    curves = {"sigmoid": [{"coverage": c, "f1": 0.3 + 0.05 * math.log(c)} for c in (0.8, 1.2, 2.0, 4.0, 8.0)]}
    trivial = {"given_label": {"coverage": 1.0, "f1": 0.4}, "every_class": {"coverage": 10.0, "f1": 0.2}}
    path = plot_f1_vs_coverage(tmp_path, curves, trivial)
    assert path.stat().st_size > 10_000


# -- MILe's phase ends: the trainer's records and the report's phases files ------------------------------

# warmup 2 + k_t 3, then k_s 2 / k_t 3 over 12 steps: phases end after steps 5, 7, 10 and 12; at rho 0.1
# (not 0.25) so few steps already give pseudo-labels, and a pseudo_precision to compare
PHASE_RUN = {"method.warmup_steps": 2, "method.rho": 0.1, "num_steps": 12, "checkpoint_every": 12}
PHASE_ENDS = [(5, "teacher", 0), (7, "student", 0), (10, "teacher", 1), (12, "student", 1)]


def phase_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "phase_eval"]


@pytest.fixture(scope="module")
def mile_run(grid_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phases") / "mile"
    Trainer(tiny_config(grid_root, out, **PHASE_RUN), CPU).run()
    return out


@pytest.mark.slow
def test_mile_scores_the_learner_at_every_phase_end(mile_run: Path) -> None:
    plan = PhasePlan(saved_config(mile_run).method)
    ends = [
        (step, plan.position(step - 1).phase.value, plan.position(step - 1).cycle)
        for step in range(1, 13)
        if step == 12 or plan.position(step).phase != plan.position(step - 1).phase
    ]
    assert ends == PHASE_ENDS  # roles alternate: the teacher an imitation copies, then the student
    records = phase_records(mile_run)
    assert [(r["step"], r["role"], r["cycle"]) for r in records] == ends
    for record in records:
        assert record["num_images"] == 160 and 0 <= record["top1"] <= 1 and 0 <= record["lrap"] <= 1, record
        assert record["pseudo_set_size"] >= 0 and 0 <= record["pseudo_recall"] <= 1, record
        assert 0 <= record["pseudo_empty_fraction"] <= 1, record


def test_no_phase_records_for_baselines_or_when_turned_off(grid_root: Path, tmp_path: Path) -> None:
    variants: dict[str, dict[str, Any]] = {"sigmoid": {"method.name": "sigmoid"}, "off": {"eval_phase_ends": False}}
    for name, overrides in variants.items():
        Trainer(tiny_config(grid_root, tmp_path / name, **PHASE_RUN, **overrides), CPU).run()
        assert (tmp_path / name / "summary.json").is_file()
        assert phase_records(tmp_path / name) == [], name


@pytest.mark.slow
def test_report_plots_and_tabulates_teacher_and_student_at_every_phase_end(mile_run: Path, tmp_path: Path) -> None:
    baseline = fake_run(tmp_path / "runs" / "sigmoid", "sigmoid")  # no phase records: left out, silently
    result = run_in_process("tools/report.py", str(mile_run), str(baseline), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report" / "phases.png").stat().st_size > 10_000
    with open(tmp_path / "report" / "phases.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["step"]), r["role"], int(r["cycle"])) for r in rows] == PHASE_ENDS
    assert {r["group"] for r in rows} == {"mile"} and {r["seeds"] for r in rows} == {"1"}
    for row, record in zip(rows, phase_records(mile_run)):
        for key in ("top1", "lrap", "f1@top|T|", "f1@matched", "pseudo_set_size", "pseudo_precision"):
            assert record[key] is not None and float(row[key]) == record[key], (key, row, record)


def test_report_writes_no_phases_files_without_phase_records(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path / "runs" / method, method) for method in ("sigmoid", "mile")]  # an older MILe run
    result = run_in_process("tools/report.py", *map(str, runs), "--out", str(tmp_path / "report"), "--no-score-models")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report" / "table.md").is_file()
    assert not (tmp_path / "report" / "phases.png").exists() and not (tmp_path / "report" / "phases.csv").exists()


@pytest.fixture(autouse=True)
def _agg(monkeypatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")
