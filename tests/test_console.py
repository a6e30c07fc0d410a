"""What a user sees in a log file: the converters, ``verify`` and ``engine-run`` with stdout and
stderr redirected to a file (a cluster job) print plain lines, no progress bar's carriage returns,
and the trainer prints one line per eval point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import image_bytes
from helpers import CPU_FLAGS

from engine.config import Method
from engine.phases import Phase, PhasePosition
from engine.trainer import describe_position, eval_line

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "square", "star")


def redirected(args: list[str], log: Path, timeout: float = 300) -> tuple[int, str]:
    """Run ``python ARGS`` with stdout and stderr both written to ``log``; (exit status, the log)."""
    with log.open("w") as out:
        code = subprocess.run(
            [sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO
        ).returncode
    return code, log.read_text()


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory) -> Path:
    """A user's own small multi-label folder: 24 JPEGs of 32 px, label files for train and val."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    rows = []
    for index in range(24):
        (root / f"img_{index:02d}.jpg").write_bytes(image_bytes(32, 32, seed=index))
        names = list(rng.choice(CLASSES, size=1 + index % 2, replace=False))
        rows.append(f"img_{index:02d}.jpg,{names[0]},{';'.join(names)}")
    (root / "train.csv").write_text("path,label,labels\n" + "\n".join(rows[:16]) + "\n")
    (root / "val.csv").write_text("path,label,labels\n" + "\n".join(rows[16:]) + "\n")
    return root


def test_converter_and_verify_logs_hold_plain_lines(shapes_folder: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    for split in ("train", "val"):
        args = [
            "-m",
            "shards.cli",
            "folder",
            "--images",
            str(shapes_folder),
            "--labels",
            str(shapes_folder / f"{split}.csv"),
        ]
        code, log = redirected(
            [*args, "--split", split, "--out", str(shards), "--workers", "1"], tmp_path / f"{split}.log"
        )
        assert code == 0, log
        assert "\r" not in log and f"{split}: {16 if split == 'train' else 8}/" in log, log
    code, log = redirected(["-m", "shards.cli", "verify", str(shards), "--workers", "1"], tmp_path / "verify.log")
    assert code == 0, log
    assert "\r" not in log and "verify: 24/24 img (100%)" in log, log


def test_engine_run_log_has_one_line_per_eval_point_and_no_bar(shapes_folder: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    for split in ("train", "val"):
        args = ["folder", "--images", str(shapes_folder), "--labels", str(shapes_folder / f"{split}.csv")]
        code, log = redirected(
            ["-m", "shards.cli", *args, "--split", split, "--out", str(shards), "--workers", "1"], tmp_path / "c.log"
        )
        assert code == 0, log
    run = tmp_path / "run"
    flags = ["--data", str(shards), "--out", str(run), *CPU_FLAGS]
    flags += ["--method", "mile", "--warmup-steps", "2", "--k-teacher-steps", "2", "--k-student-steps", "2"]
    flags += ["--steps", "8", "--eval-every", "3", "--log-every", "2", "--batch-size", "4", "--arch", "grid_cnn"]
    code, log = redirected(["-m", "engine.commands.run", *flags], tmp_path / "run.log")
    assert code == 0, log
    assert "\r" not in log
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    eval_steps = [record["step"] for record in evals if record["kind"] == "eval"]
    eval_lines = [line for line in log.splitlines() if line.startswith("eval step ")]
    assert eval_steps == [3, 6, 8] and len(eval_lines) == len(eval_steps), log
    assert eval_lines[0].startswith("eval step 3/8 (") and " top1 " in eval_lines[0] and "f1@0.25" in eval_lines[0]
    assert "loader: torch (asked for)" in log
    assert "max over ranks" not in log and "PhasePosition" not in log and "Phase." not in log


def test_positions_and_eval_lines_read_as_words() -> None:
    position = PhasePosition(phase=Phase("student"), step_in_phase=4, cycle=2)
    assert describe_position(position, Method.MILE) == "student phase, cycle 2, its step 5"
    assert describe_position(PhasePosition(Phase("train"), 0, 0), Method.SIGMOID) == "train phase, its step 1"
    metrics = {"num_images": 8, "top1": 0.5, "f1@0.25": 0.25, "coverage@0.25": 1.5, "extra/val/top1": 0.125}
    line = eval_line(6, 8, "train phase, its step 6", metrics, (0.25, 0.5))
    figures = "top1 0.5000 f1@0.25 0.2500 coverage@0.25 1.5000 extra/val/top1 0.1250"
    assert line == f"eval step 6/8 (train phase, its step 6): {figures}"
