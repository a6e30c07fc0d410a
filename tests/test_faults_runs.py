"""A run folder is the user's data, and a model's classes cannot drift (issue 19 items 1 and 2):
through the real commands, engine-run refuses a folder of the user's files and a folder another
process trains in; a sweep's run folders stay inside its --out whatever its grid holds; export takes
the classes from the run (no data needed) and resume and mile-eval refuse data whose classes differ."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import CPU, REPO, run_cli_in_process, run_in_process, tiny_config

from engine.checkpoint import read_checkpoint, write_payload
from engine.commands.sweep import load_sweep
from engine.trainer import Trainer

TINY = (
    *("--device", "cpu", "--steps", "4", "--eval-every", "4", "--log-every", "2", "--batch-size", "32"),
    *("--data.num_workers", "0", "--data.backend", "torch"),
    # MILe (the default method) with room to imitate in 4 steps: teacher steps 1-2, student 3-4
    *("--warmup-steps", "0", "--k-teacher-steps", "2", "--k-student-steps", "2"),
)


def engine_run(data: Path, out: Path, *extra: str):
    return run_cli_in_process("--data", str(data), "--out", str(out), *TINY, *extra, timeout=120)


# -- 1a. a folder of the user's files is not a run --------------------------------------------


@pytest.mark.parametrize("resume_flag", [(), ("--resume-auto",)])
def test_a_folder_of_the_users_own_files_is_refused_untouched(
    grid_root: Path, tmp_path: Path, resume_flag: tuple[str, ...]
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    mine = {
        "metrics.jsonl": '{"step": 1, "mine": true}\n',
        "config.toml": "# my own notes\n",
        "run.json": '{"project": "mine"}\n',  # a file of the same name as the run's mark is not the mark
    }
    for name, text in mine.items():
        (out / name).write_text(text)
    result = engine_run(grid_root, out, *resume_flag)
    assert result.returncode == 2, result.stderr
    assert f"--out {out} is not empty" in result.stderr and "config.toml" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(path.name for path in out.iterdir()) == sorted(mine)
    assert all((out / name).read_text() == text for name, text in mine.items())


def test_a_folder_whose_run_died_before_its_first_checkpoint_starts_afresh(grid_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    Trainer(tiny_config(grid_root, out, num_steps=4, eval_every=4), CPU).run()
    shutil.rmtree(out / "checkpoints")
    (out / "summary.json").unlink()  # what a run killed before its first checkpoint leaves: run.json, logs
    result = engine_run(grid_root, out)
    assert result.returncode == 0, result.stderr
    assert (out / "summary.json").is_file()


# -- 1b. one process per run folder ------------------------------------------------------------


HOLD = """
import sys, time
from engine.run_folder import RunFolder
with RunFolder(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("flags", [(), ("--resume-auto",), ("--resume",)])
def test_a_second_process_on_one_out_is_refused_with_the_holders_pid(
    grid_root: Path, tmp_path: Path, flags: tuple[str, ...]
) -> None:
    out = tmp_path / "run"
    assert engine_run(grid_root, out).returncode == 0
    (out / "summary.json").unlink()  # an unfinished run: --resume-auto would resume it
    before = {path.name: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        if flags == ("--resume",):
            result = run_cli_in_process("--out", str(out), "--resume", "--steps", "8", timeout=120)
        else:
            result = engine_run(grid_root, out, *flags)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr
    assert f"pid {holder.pid}" in result.stderr and "engine-run" in result.stderr
    assert "Traceback" not in result.stderr
    after = {path.name: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    after.pop(".engine-run.lock")  # the killed holder's (the kernel dropped its lock; a new run ignores it)
    assert after == before  # nothing of the first process's run was touched


def test_the_lock_is_released_when_the_run_ends(grid_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert engine_run(grid_root, out).returncode == 0
    assert not (out / ".engine-run.lock").exists()
    result = run_cli_in_process("--out", str(out), "--resume", "--steps", "6", timeout=120)
    assert result.returncode == 0, result.stderr


# -- 1c. a sweep's run folders stay inside its --out -------------------------------------------

HOSTILE = ["../../escape", "/abs/olute", "a/b", "..", ".", "back\\slash", "a_b", "x" * 300]


def hostile_sweep(path: Path) -> Path:
    values = ", ".join(json.dumps(value) for value in HOSTILE)
    path.write_text(f'[grid.softmax]\n"data.root" = [{values}]\n')
    return path


def test_sweep_run_folders_stay_inside_out_whatever_the_grid_holds(tmp_path: Path) -> None:
    sweep, out = hostile_sweep(tmp_path / "sweep.toml"), tmp_path / "sweeps" / "out"
    result = run_in_process("tools/sweep.py", str(sweep), "--out", str(out), "--dry-run", timeout=60)
    assert result.returncode == 0, result.stderr
    runs, _ = load_sweep(sweep, out)
    folders = [Path(run.config.out_dir).resolve() for run in runs]
    assert len(set(folders)) == len(HOSTILE)  # "a/b" and "a_b" do not share a folder
    for folder in folders:
        assert folder.parent == (out / "softmax").resolve(), folder
        assert len(folder.name) <= 120
    for run in runs:
        assert run.name in result.stdout


@pytest.mark.slow
def test_a_sweep_over_relative_data_paths_trains_inside_out(grid_root: Path, tmp_path: Path) -> None:
    """Two spellings of one data folder, one of them climbing with ``..``: both runs land in --out."""
    climbing = os.path.relpath(grid_root, REPO)  # the command runs in the repository folder
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        textwrap.dedent(f"""
        [overrides]
        num_steps = 2
        eval_every = 2
        log_every = 1
        global_batch_size = 32
        device = "cpu"
        "data.num_workers" = 0
        "data.backend" = "torch"
        [grid.softmax]
        "data.root" = [{json.dumps(str(grid_root))}, {json.dumps(climbing)}]
        """)
    )
    out = tmp_path / "out"
    result = run_in_process("tools/sweep.py", str(sweep), "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr
    summaries = sorted((out / "softmax").glob("*/summary.json"))
    assert len(summaries) == 2


# -- 2. class names cannot drift ---------------------------------------------------------------


def renamed(data: Path, index: int, name: str) -> None:
    """``data`` re-converted with class ``index`` named ``name`` (same count, other names)."""
    path = data / "manifest.json"
    manifest = json.loads(path.read_text())
    for split in manifest["splits"].values():
        split["class_names"][index] = name
    path.write_text(json.dumps(manifest))


@pytest.fixture
def run_on_copy(grid_root: Path, tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """(data copy, finished 4-step softmax run on it, its class names)."""
    data = tmp_path / "data"
    shutil.copytree(grid_root, data)
    out = tmp_path / "run"
    config = tiny_config(data, out, num_steps=4, eval_every=4, checkpoint_every=2, **{"method.name": "softmax"})
    Trainer(config, CPU).run()
    names = json.loads((data / "manifest.json").read_text())["splits"]["train"]["class_names"]
    return data, out, names


def mile_export(run: Path, out: Path):
    return run_in_process("engine.commands.export", str(run), "--out", str(out), timeout=120)


def test_the_run_records_its_classes_with_a_fingerprint(run_on_copy) -> None:
    _, out, names = run_on_copy
    record = json.loads((out / "run.json").read_text())
    assert record["class_names"] == names and len(record["class_names_sha256"]) == 64
    checkpoint = read_checkpoint(out / "checkpoints" / "last.pt")
    assert checkpoint["classes"] == {k: v for k, v in record.items() if k != "project"}


def test_export_needs_no_data_and_keeps_the_trained_names(run_on_copy, tmp_path: Path) -> None:
    data, out, names = run_on_copy
    renamed(data, 2, "zebra")  # re-converted with other names: export must not take them
    assert mile_export(out, tmp_path / "model").returncode == 0
    assert json.loads((tmp_path / "model" / "model.json").read_text())["class_names"] == names
    shutil.rmtree(data)  # and with no data at all
    result = mile_export(out, tmp_path / "model2")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "model2" / "model.json").read_text())["class_names"] == names


def test_resume_refuses_data_whose_classes_changed(run_on_copy) -> None:
    data, out, names = run_on_copy
    (out / "summary.json").unlink()
    renamed(data, 2, "zebra")
    result = run_cli_in_process("--out", str(out), "--resume", "--steps", "8", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "class index 2" in result.stderr and "'zebra'" in result.stderr and repr(names[2]) in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_refuses_a_checkpoint_trained_on_other_classes(run_on_copy) -> None:
    """run.json agrees with the data but the checkpoint does not (a checkpoint copied from another run)."""
    data, out, names = run_on_copy
    (out / "summary.json").unlink()
    renamed(data, 0, "zebra")
    record = json.loads((out / "run.json").read_text())
    record["class_names"][0] = "zebra"
    from engine.run_folder import class_fingerprint

    record["class_names_sha256"] = class_fingerprint(record["class_names"])
    (out / "run.json").write_text(json.dumps(record))
    result = run_cli_in_process("--out", str(out), "--resume", "--steps", "8", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "class index 0" in result.stderr and "last.pt" in result.stderr


def test_eval_refuses_a_split_with_other_class_names(run_on_copy, tmp_path: Path) -> None:
    data, out, names = run_on_copy
    assert mile_export(out, tmp_path / "model").returncode == 0
    renamed(data, 5, "zebra")
    result = run_in_process(
        "engine.commands.evaluate", "--model", str(tmp_path / "model"), "--data", str(data), "--device", "cpu"
    )
    assert result.returncode == 2, result.stderr
    assert "class index 5" in result.stderr and "'zebra'" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_edited_class_record_is_named(run_on_copy) -> None:
    data, out, _ = run_on_copy
    (out / "summary.json").unlink()
    record = json.loads((out / "run.json").read_text())
    record["class_names"][1] = "zebra"  # fingerprint left as it was
    (out / "run.json").write_text(json.dumps(record))
    result = run_cli_in_process("--out", str(out), "--resume", "--steps", "8", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "run.json" in result.stderr and "class_names_sha256" in result.stderr


def test_a_run_of_an_older_release_resumes_and_exports_from_the_data(
    run_on_copy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No run.json, no class record in the checkpoint: the data's classes, with a warning (documented)."""
    data, out, names = run_on_copy
    (out / "summary.json").unlink()
    (out / "run.json").unlink()
    path = out / "checkpoints" / "last.pt"
    payload = read_checkpoint(path)
    del payload["classes"], payload["digest"]
    write_payload(payload, [path])
    assert "classes" not in torch.load(path, weights_only=True)
    result = mile_export(out, tmp_path / "model")
    assert result.returncode == 0, result.stderr
    assert "holds no class record" in caplog.text
    assert json.loads((tmp_path / "model" / "model.json").read_text())["class_names"] == names
    result = run_cli_in_process("--out", str(out), "--resume", "--steps", "6", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "run.json (a run of an older release)" in caplog.text
    assert json.loads((out / "run.json").read_text())["class_names"] == names  # recorded from now on
