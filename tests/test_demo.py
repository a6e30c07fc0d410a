"""The main job's table and plots, seeds, and sweeps, on tiny data."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import run_in_process
from typer.testing import CliRunner

from engine.config import build_config, load_toml, to_toml


def tiny_base(grid_root: Path, tmp_path: Path) -> Path:
    config = build_config(
        {},
        {
            "data.root": str(grid_root),
            "arch": "grid_cnn",  # the grid's model and size: the schema's defaults are photo-sized
            "data.image_size_px": 24,
            "data.augment": False,
            "data.backend": "torch",
            "data.num_workers": 0,
            "num_steps": 6,
            "global_batch_size": 32,
            "eval_every": 6,
            "log_every": 3,
            "checkpoint_every": 6,
            "device": "cpu",
            "method.k_teacher_steps": 2,
            "method.k_student_steps": 2,
            "method.rho": 0.1,
        },
    )
    path = tmp_path / "tiny.toml"
    path.write_text(to_toml(config))
    return path


@pytest.fixture(scope="module")
def demo_out(grid_root: Path, tmp_path_factory) -> Path:
    """The demo's --out after a tiny run: three methods, two seeds each."""
    import typer

    from engine.commands.demo import main

    tmp_path = tmp_path_factory.mktemp("demo")
    app = typer.Typer()
    app.command()(main)
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        app, ["--config", str(tiny_base(grid_root, tmp_path)), "--out", str(out), "--seeds", "2"]
    )
    assert result.exit_code == 0, result.output
    return out


def report(*args: str) -> subprocess.CompletedProcess:
    return run_in_process("tools/report.py", *args, timeout=600)


@pytest.mark.slow
def test_demo_table_has_every_method_the_no_model_rows_and_both_plots(demo_out: Path) -> None:
    out = demo_out
    rows = list(csv.DictReader(open(out / "table.csv")))
    methods = [row["method"] for row in rows]
    assert methods[:3] == ["softmax", "sigmoid", "mile"]
    assert "no model: given label" in methods and "no model: all classes" in methods
    for row in rows[:3]:
        assert row["seeds"] == "2" and "±" in row["F1@matched"] and "±" in row["LRAP"]
        assert row["paper F1@0.25"] != "-" and row["wall s"] != "-"
    all_classes = next(row for row in rows if row["method"] == "no model: all classes")
    assert all_classes["coverage@0.25"] == "10.00"
    assert (out / "f1_curve.png").stat().st_size > 0 and (out / "f1_vs_coverage.png").stat().st_size > 0
    assert (out / "mile-seed1" / "summary.json").is_file()


@pytest.mark.slow
def test_report_over_the_demos_run_folders_writes_the_demos_table(demo_out: Path, tmp_path: Path) -> None:
    result = report(str(demo_out), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "report" / "table.md").read_text() == (demo_out / "table.md").read_text()
    assert (tmp_path / "report" / "table.csv").read_text() == (demo_out / "table.csv").read_text()
    assert (tmp_path / "report" / "f1_curve.png").is_file() and (tmp_path / "report" / "f1_vs_coverage.png").is_file()


@pytest.mark.slow
def test_report_lists_unfinished_runs_groups_as_asked_and_refuses_other_folders(demo_out: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for name in ("mile", "mile-seed1", "sigmoid"):
        shutil.copytree(demo_out / name, runs / name)
    (runs / "mile-seed1" / "summary.json").unlink()  # as if it were still training
    result = report(
        str(runs / "mile"),
        str(runs / "mile-seed1"),
        str(runs / "sigmoid"),
        "--out",
        str(tmp_path / "r"),
        "--metrics",
        "top1",
        "--metrics",
        "lrap",
        "--no-score-models",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "r" / "table.csv")))
    assert [(row["method"], row["seeds"]) for row in rows] == [("sigmoid", "1"), ("mile", "1")]
    assert list(rows[0]) == ["method", "seeds", "top1", "lrap", "paper F1@0.25", "wall s"]
    assert "Unfinished runs (no summary.json; not in the table): " in (tmp_path / "r" / "table.md").read_text()
    assert "mile-seed1 (step 6 of 6)" in (tmp_path / "r" / "table.md").read_text()

    grouped = report(str(runs), "--out", str(tmp_path / "g"), "--group-by", "data.eval_split", "--no-score-models")
    assert grouped.returncode == 0, grouped.stderr[-3000:]
    assert [(row["method"], row["seeds"]) for row in csv.DictReader(open(tmp_path / "g" / "table.csv"))] == [
        ("all runs", "2")
    ]

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a run")
    for bad, message in (
        (tmp_path / "empty", "is not a run folder (no config.toml) and holds none"),
        (tmp_path / "nowhere", "does not exist"),
    ):
        refused = report(str(bad), "--out", str(tmp_path / "x"))
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr
    wrong_key = report(str(runs), "--out", str(tmp_path / "x"), "--group-by", "rhoo")
    assert wrong_key.returncode == 2 and "--group-by rhoo: not a config key" in wrong_key.stderr


@pytest.mark.slow
def test_sweep_runs_every_combination_marks_the_chosen_and_reuses_runs(grid_root: Path, tmp_path: Path) -> None:
    base = tiny_base(grid_root, tmp_path)
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        f'base = "{base.name}"\nselect_by = "lrap"\n[overrides]\n"method.warmup_steps" = 0\n'
        '[grid.sigmoid]\n"optim.lr_per_256" = [0.05, 0.2]\n'
        '[grid.mile]\n"method.k_teacher_steps,method.k_student_steps" = [[2, 2], [3, 1]]\n'
    )
    out = tmp_path / "sweep"
    command = ["tools/sweep.py", str(sweep), "--out", str(out)]
    first = run_in_process(*command, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["method"], r["run"]) for r in rows] == [
        ("sigmoid", "lr_per_256=0.05"),
        ("sigmoid", "lr_per_256=0.2"),
        ("mile", "k_teacher_steps=2,k_student_steps=2"),
        ("mile", "k_teacher_steps=3,k_student_steps=1"),
    ]
    assert (out / "sweep.md").read_text().count("(chosen)") == 2
    saved = load_toml(out / "mile" / "k_teacher_steps=3,k_student_steps=1" / "config.toml")
    assert saved["method"]["k_teacher_steps"] == 3 and saved["method"]["k_student_steps"] == 1
    stamp = (out / "sigmoid" / "lr_per_256=0.2" / "checkpoints" / "last.pt").stat().st_mtime_ns
    again = run_in_process(*command, timeout=600)
    assert again.returncode == 0 and "reusing the finished run" in again.stdout
    assert (out / "sigmoid" / "lr_per_256=0.2" / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp

    table = list(csv.DictReader(open(out / "table.csv")))
    assert [row["method"] for row in table[:4]] == [
        "sigmoid lr_per_256=0.05",
        "sigmoid lr_per_256=0.2",
        "mile k_teacher_steps=2 k_student_steps=2",
        "mile k_teacher_steps=3 k_student_steps=1",
    ]
    result = report(str(out), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "report" / "table.md").read_text() == (out / "table.md").read_text()
