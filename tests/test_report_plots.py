"""tools/report.py's plots: titles and axes in words, plain coverage ticks, legends beside the axes
(no annotation over a curve), MILe's imitation phases shaded on the curve over steps."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from engine.commands.report import metric_words, phase_spans, plain_log_ticks, plot_f1_vs_coverage
from engine.commands.run import resolve_config
from engine.config import to_toml

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


@pytest.fixture(autouse=True)
def _agg(monkeypatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")
