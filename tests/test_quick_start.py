"""The README's "Your own images" quick start, run as written on a generated folder: its label file
format, then every command of its code block (convert train and val, verify, train, report, export,
predict), with the example folder names replaced by the test's and only the run's sizes scaled down.
Also: every folder the README's examples write is ignored by git, and no source file is."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, run_cli_in_process, run_in_process
from PIL import Image

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SECTION = "## Your own images: a quick start"
CLASSES = ("circle", "cross", "square", "star", "triangle")
# The example names of the quick start -> the test's (relative to tmp_path).
FOLDERS = ("photos", "train.csv", "val.csv", "data/mine", "runs/mine", "models/mine", "preds.jsonl")
# engine-run's sizes, scaled to a CPU test (the flags stay as written; a missing one fails the test).
SCALED = {
    "--steps": "7",  # teacher 1-3, student 4, teacher 5-6, student 7: ends with an imitation phase
    "--batch-size": "8",
    "--image-size": "32",
    "--warmup-steps": "1",
    "--k-teacher-steps": "2",
    "--k-student-steps": "1",
}


def quick_start_blocks() -> list[str]:
    """The fenced code blocks of the README's quick-start section, in order."""
    text = (REPO / "README.md").read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^ *```[a-z]*\n(.*?)^ *```", section, flags=re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """Each command line of a shell block (continuations joined, comments dropped), split as a shell does."""
    joined = re.sub(r"\\\n", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def console_scripts() -> dict[str, str]:
    """``make-shards`` -> ``shards.cli``: the module each installed command runs."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.split(":")[0] for name, target in scripts.items()}


def substituted(argv: list[str], tmp_path: Path) -> list[str]:
    def one(token: str) -> str:
        for name in FOLDERS:
            if token == name or token.startswith(name + "/"):
                return str(tmp_path / token)
        return token

    return [one(token) for token in argv]


def scaled(argv: list[str]) -> list[str]:
    for flag, value in SCALED.items():
        assert flag in argv, f"the quick start's engine-run has no {flag}; update SCALED"
        argv[argv.index(flag) + 1] = value
    return argv


def shapes_folder(root: Path, count: int) -> list[tuple[str, tuple[str, ...]]]:
    """``count`` small JPEGs in two subfolders, each with a set of 1-3 classes."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        listed = tuple(str(c) for c in rng.choice(CLASSES, size=1 + i % 3, replace=False))
        path = f"{'ab'[i % 2]}/{i:03d}.jpg"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(rng.normal(100 + 20 * CLASSES.index(listed[0]), 30, (40, 48, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(root / path, quality=90)
        rows.append((path, listed))
    return rows


def write_label_files(tmp_path: Path, header: str, rows: list[tuple[str, tuple[str, ...]]]) -> None:
    assert header == "path,labels", header
    for name, part in (("train.csv", rows[:32]), ("val.csv", rows[32:])):
        lines = [header] + [f"{path},{';'.join(listed)}" for path, listed in part]
        (tmp_path / name).write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_the_readme_quick_start_runs_as_written(tmp_path):
    example, code = quick_start_blocks()[:2]
    rows = shapes_folder(tmp_path / "photos", 40)
    write_label_files(tmp_path, example.strip().splitlines()[0].strip(), rows)
    scripts = console_scripts()
    for argv in commands(code):
        argv = substituted(argv, tmp_path)
        if argv[0] == "python":
            target, args = argv[1], argv[2:]
        else:
            assert argv[0] in scripts, f"{argv[0]} is not a command this project installs"
            target, args = scripts[argv[0]], argv[1:]
        if target == "engine.commands.run":
            args = scaled(args)
        result = run_in_process(target, *args, timeout=600)
        assert result.returncode == 0, f"{shlex.join(argv)} failed:\n{result.stderr[-3000:]}"
    summary = json.loads((tmp_path / "runs/mine/summary.json").read_text())
    assert summary["method"] == "mile" and summary["num_evaluated"] == 8 and "f1@0.25" in summary
    assert (tmp_path / "runs/mine/report/table.md").is_file()
    assert json.loads((tmp_path / "models/mine/model.json").read_text())["class_names"] == list(CLASSES)
    predictions = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert len(predictions) == len(rows)


def readme_outputs() -> set[str]:
    """Every ``--out`` of the README's code blocks that lies inside the repository (not /path/...)."""
    text = (REPO / "README.md").read_text()
    outs = set()
    for block in re.findall(r"^ *```[a-z]*\n(.*?)^ *```", text, flags=re.S | re.M):
        without_comments = re.sub(r"(^|\s)#.*", "", block, flags=re.M)
        outs.update(re.findall(r"--out[ =]([\w./-]+)", without_comments))
    return {out for out in outs if not out.startswith("/")}


def test_the_readme_example_outputs_are_ignored_by_git_and_the_sources_are_not():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    outputs = readme_outputs()
    assert {"data/mine", "runs/mine", "models/mine", "preds.jsonl"} <= outputs
    sources = ["shards/sources/folder.py", "shards/cli.py", "engine/config.py"]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *sorted(outputs), *sources],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert sorted(outputs - set(ignored)) == [] and set(sources).isdisjoint(ignored)


def test_a_saved_config_repeats_its_run_into_a_new_out_as_the_readme_says(grid_root, tmp_path):
    first = tmp_path / "sig"
    args = ("--method", "sigmoid", "--steps", "2", "--batch-size", "16", "--eval-every", "2", "--device", "cpu")
    loader = ("--loader", "torch", "--workers", "0")
    result = run_cli_in_process("--data", str(grid_root), *args, *loader, "--out", str(first))
    assert result.returncode == 0, result.stderr[-2000:]
    saved = str(first / "config.toml")
    refused = run_cli_in_process("--config", saved)
    assert refused.returncode != 0 and "choose another --out" in refused.stderr
    again = run_cli_in_process("--config", saved, "--out", str(tmp_path / "sig-again"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "sig-again/summary.json").read_text()) == json.loads(
        (first / "summary.json").read_text()
    )
