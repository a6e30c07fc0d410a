"""Inputs read back from disk and resource knobs, checked at the door through the real commands (issue 19
items 6-9, engine side): a hand-edited config.toml before --resume or export, summary.json in the report,
--workers past the machine, non-finite or absurd optimizer values, --out of the wrong kind, unreadable
weights, malformed sweep files, and init checkpoints that are not checkpoints or not finite. Each is one
line naming the file, key or flag, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from helpers import CPU, CPU_FLAGS, learner_weights, run_cli_in_process, run_in_process, tiny_config

from engine.config import tomllib
from engine.trainer import Trainer
from shards.manifest import load_split, read_index


def one_error_line(result) -> str:
    """The command failed as a user's mistake should: status 2, one line on stderr naming the fault."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    after = result.stderr.split(lines[0], 1)[1].splitlines()
    assert not any(line[:1].isspace() for line in after), result.stderr  # no indented continuation (advice, frames)
    return lines[0]


@pytest.fixture(scope="module")
def finished(grid_root: Path, tmp_path_factory) -> Path:
    """A finished 4-step run (read only: tests copy it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    Trainer(tiny_config(grid_root, out, num_steps=4, eval_every=4, checkpoint_every=2), CPU).run()
    return out


@pytest.fixture
def run_copy(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


@pytest.fixture(scope="module")
def exported(finished: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "model"
    result = run_in_process("engine.commands.export", str(finished), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def edit_config(run: Path, section: str | None, key: str, value) -> None:
    path = run / "config.toml"
    values = tomllib.loads(path.read_text())
    (values[section] if section else values)[key] = value
    path.write_text(tomli_w.dumps(values))


# -- item 6: config.toml edited by hand, checked against what the checkpoint recorded -----------------


def test_a_hand_edited_learning_rate_is_refused_on_resume_naming_the_key(run_copy: Path) -> None:
    edit_config(run_copy, "optim", "lr_per_256", 0.7)
    metrics = (run_copy / "metrics.jsonl").read_text()
    line = one_error_line(run_cli_in_process("--out", str(run_copy), "--resume", "--steps", "8"))
    assert "optim.lr_per_256" in line and "0.7" in line and "last.pt" in line
    assert (run_copy / "metrics.jsonl").read_text() == metrics  # nothing trained, nothing rewritten


@pytest.mark.parametrize("section, key, value", [("method", "rho", 0.5), (None, "arch", "resnet18")])
def test_any_hand_edit_of_what_the_run_is_is_refused_on_resume(run_copy: Path, section, key, value) -> None:
    edit_config(run_copy, section, key, value)
    line = one_error_line(run_cli_in_process("--out", str(run_copy), "--resume", "--steps", "8"))
    assert f"{section + '.' if section else ''}{key}" in line


def test_a_hand_edited_resume_safe_key_is_taken_and_logged(run_copy: Path, caplog) -> None:
    edit_config(run_copy, None, "log_every", 1)
    with caplog.at_level(logging.INFO):
        result = run_cli_in_process("--out", str(run_copy), "--resume", "--steps", "5")
    assert result.returncode == 0, result.stderr
    assert "resume-safe" in caplog.text and "log_every" in caplog.text


@pytest.mark.parametrize("how", ["flag", "edit"])
def test_fewer_steps_than_the_checkpoint_took_are_refused(run_copy: Path, how: str) -> None:
    if how == "edit":
        edit_config(run_copy, None, "num_steps", 2)
    config = (run_copy / "config.toml").read_text()
    flags = ["--steps", "2"] if how == "flag" else []
    line = one_error_line(run_cli_in_process("--out", str(run_copy), "--resume", *flags))
    assert "num_steps (--steps) 2" in line and "4 steps" in line
    assert (run_copy / "config.toml").read_text() == config  # num_steps not rewritten


@pytest.mark.parametrize("section, key, value", [(None, "arch", "resnet18"), ("method", "name", "softmax")])
def test_export_refuses_a_config_edited_after_training(run_copy: Path, tmp_path: Path, section, key, value) -> None:
    edit_config(run_copy, section, key, value)
    line = one_error_line(run_in_process("engine.commands.export", str(run_copy), "--out", str(tmp_path / "m")))
    assert str(run_copy / "config.toml") in line and f"{section + '.' if section else ''}{key}" in line
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "text, key",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"step": 4, "method": "mile", "top1": "high"}', "'top1'"),
        ('{"step": -1, "method": "mile"}', "'step'"),
        ('{"step": 4, "method": 3}', "'method'"),
    ],
)
def test_report_names_a_malformed_summary(run_copy: Path, tmp_path: Path, text: str, key: str) -> None:
    (run_copy / "summary.json").write_text(text)
    result = run_in_process("tools/report.py", str(run_copy), "--out", str(tmp_path / "r"), "--no-score-models")
    line = one_error_line(result)
    assert str(run_copy / "summary.json") in line and key in line


# -- item 7: resource knobs bounded by the machine ----------------------------------------------------


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_workers_past_the_machine_are_refused_naming_the_flag(grid_root: Path, tmp_path: Path, loader: str) -> None:
    out = tmp_path / "out"
    args = ["--data", str(grid_root), "--loader", loader, "--workers", "100000", "--out", str(out), "--device", "cpu"]
    line = one_error_line(run_cli_in_process(*args, timeout=60))
    assert "--workers" in line and "100000" in line
    assert not out.exists()


def test_eval_workers_past_the_machine_are_refused(exported: Path, grid_root: Path) -> None:
    args = ["--model", str(exported), "--data", str(grid_root), "--workers", "100000"]
    line = one_error_line(run_in_process("engine.commands.evaluate", *args, timeout=60))
    assert "--workers" in line


# -- item 8: no traceback for a user's mistake --------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--lr", "1e300"), ("--weight-decay", "1e300")]
)
def test_non_finite_or_absurd_optimizer_values_are_refused_at_the_door(flag: str, value: str) -> None:
    line = one_error_line(run_cli_in_process(flag, value, "--print-config"))
    assert flag in line


def test_a_non_finite_value_in_a_config_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlr_per_256 = inf\n")
    line = one_error_line(run_cli_in_process("--config", str(path), "--print-config"))
    assert "optim.lr_per_256" in line and "finite" in line


def test_engine_run_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("mine")
    line = one_error_line(run_cli_in_process("--out", str(tmp_path / "taken"), "--device", "cpu"))
    assert "--out" in line and str(tmp_path / "taken") in line and "Free space" not in line
    assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.parametrize("command", ["export", "report", "eval_dir", "predict_dir", "eval_under_file"])
def test_out_of_the_wrong_kind_is_one_line(command: str, finished, exported, grid_root, tmp_path: Path) -> None:
    afile, adir = tmp_path / "afile", tmp_path / "adir"
    afile.write_text("mine")
    adir.mkdir()
    model, data = ["--model", str(exported)], ["--data", str(grid_root)]
    commands = {
        "export": ("engine.commands.export", [str(finished), "--out", str(afile)]),
        "report": ("tools/report.py", [str(finished), "--out", str(afile), "--no-score-models"]),
        "eval_dir": ("engine.commands.evaluate", [*model, *data, "--out", str(adir)]),
        "eval_under_file": ("engine.commands.evaluate", [*model, *data, "--out", str(afile / "m.json")]),
        "predict_dir": ("engine.commands.predict", [str(tmp_path), *model, "--out", str(adir)]),
    }
    target, args = commands[command]
    line = one_error_line(run_in_process(target, *args))
    assert "--out" in line and (str(afile) in line or str(adir) in line)
    assert afile.read_text() == "mine" and not any(adir.iterdir())


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_unreadable_exported_weights_are_named(exported: Path, tmp_path: Path, damage: str) -> None:
    model = Path(shutil.copytree(exported, tmp_path / "model"))
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (24, 24)).save(image)
    line = one_error_line(run_in_process("engine.commands.predict", str(image), "--model", str(model)))
    assert str(weights) in line


@pytest.mark.slow
def test_a_label_outside_the_classes_under_dali_is_one_line(grid_root: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(grid_root, tmp_path / "grid"))
    record = load_split(root, "train").shards[0]
    label = next(m for m in read_index(root / record.index_path)[3] if m.ext == "lbl")
    with open(root / record.path, "r+b") as handle:
        handle.seek(label.offset)
        handle.write(np.array([77], dtype="<i4").tobytes())
    args = [
        "--data",
        str(root),
        "--loader",
        "dali",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--steps",
        "20",
        "--method",
        "sigmoid",
    ]
    line = one_error_line(run_cli_in_process(*args, "--batch-size", "32", "--out", str(tmp_path / "o")))
    assert "label 77 outside" in line and "'train'" in line


# -- sweep files: every malformed one is one line, before anything trains ----------------------------


SWEEPS = {
    "not_toml": ("[grid.mile\n", "not valid TOML"),
    "unknown_key": ('bogus = 1\n[grid.mile]\n"seed" = [1]\n', "'bogus'"),
    "base_missing": ('base = "nowhere.toml"\n[grid.mile]\n"seed" = [1]\n', "'nowhere.toml'"),
    "base_not_string": ('base = 3\n[grid.mile]\n"seed" = [1]\n', "base"),
    "overrides_not_table": ('overrides = 3\n[grid.mile]\n"seed" = [1]\n', "overrides"),
    "unknown_override": ('[overrides]\n"optim.lr" = 1\n[grid.mile]\n"seed" = [1]\n', "'optim.lr'"),
    "grid_not_table": ("grid = 3\n", "grid"),
    "unknown_method": ('[grid.milee]\n"seed" = [1]\n', "'milee'"),
    "unknown_grid_key": ('[grid.mile]\n"optim.lr" = [1]\n', "'optim.lr'"),
    "bad_value": ('[grid.mile]\n"optim.lr_per_256" = ["x"]\n', "optim.lr_per_256"),
    "grid_not_list": ('[grid.mile]\n"seed" = 3\n', "'seed'"),
    "select_by_not_string": ('select_by = 3\n[grid.mile]\n"seed" = [1]\n', "select_by"),
}


@pytest.mark.parametrize("case", sorted(SWEEPS))
def test_malformed_sweep_files_are_one_line(tmp_path: Path, case: str) -> None:
    text, named = SWEEPS[case]
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(text)
    line = one_error_line(run_in_process("tools/sweep.py", str(sweep), "--out", str(tmp_path / "out"), "--dry-run"))
    assert str(sweep) in line and named in line


def test_sweep_with_a_missing_file_is_one_line(tmp_path: Path) -> None:
    line = one_error_line(run_in_process("tools/sweep.py", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o")))
    assert "none.toml" in line


def test_an_unknown_select_by_is_refused_before_any_run_trains(grid_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.toml"
    overrides = {"data.root": str(grid_root), "num_steps": 2, "device": "cpu", "data.num_workers": 0}
    sweep.write_text(tomli_w.dumps({"select_by": "accuracy", "overrides": overrides, "grid": {"mile": {"seed": [1]}}}))
    line = one_error_line(run_in_process("tools/sweep.py", str(sweep), "--out", str(tmp_path / "out")))
    assert "select_by 'accuracy'" in line and "lrap" in line
    assert not (tmp_path / "out").exists()


# -- item 9: init checkpoints that are not finite, or not checkpoints ----------------------------------


def _init_run(grid_root: Path, tmp_path: Path, weights: Path):
    args = [
        "--data",
        str(grid_root),
        *CPU_FLAGS,
        "--steps",
        "2",
        "--method",
        "sigmoid",
    ]
    return run_cli_in_process(*args, "--init-checkpoint", str(weights), "--out", str(tmp_path / "o"))


def test_a_non_finite_init_checkpoint_is_named_not_blamed_on_the_lr(
    finished: Path, grid_root: Path, tmp_path: Path
) -> None:
    state = learner_weights(finished)
    first = next(key for key, tensor in state.items() if tensor.is_floating_point())
    state[first] = torch.full_like(state[first], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    line = one_error_line(_init_run(grid_root, tmp_path, tmp_path / "nan.pt"))
    assert "nan.pt" in line and "non-finite" in line and "--lr" not in line


class _NotWeights:
    pass


@pytest.mark.parametrize("kind", ["object", "text"])
def test_a_file_that_is_not_a_checkpoint_is_one_line(grid_root: Path, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "w.pt"
    if kind == "object":
        torch.save({"model": _NotWeights()}, path)
    else:
        path.write_text("not weights")
    result = _init_run(grid_root, tmp_path, path)
    line = one_error_line(result)
    assert str(path) in line and "weights_only=False" not in result.stderr


def test_summary_json_on_disk_is_unchanged_by_a_refused_report(run_copy: Path, tmp_path: Path) -> None:
    (run_copy / "summary.json").write_text(json.dumps({"step": 4, "method": "mile", "top1": [1]}))
    one_error_line(run_in_process("tools/report.py", str(run_copy), "--out", str(tmp_path / "r"), "--no-score-models"))
    assert not (tmp_path / "r" / "table.md").exists()
