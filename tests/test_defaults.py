"""Where a run's values come from (issue 18, items 1 and 3): a run on a user's own images starts from
the general, photo-sized defaults, not the digit grid's; --help and --print-config show what will
run; the log names each non-default value's source; a MILe run that never imitates is refused."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from conftest import image_bytes
from helpers import CPU_FLAGS, run_cli_in_process, run_in_process
from typer.testing import CliRunner

from engine.commands.run import app, help_value
from engine.config import (
    Method,
    MethodConfig,
    RunConfig,
    build_config,
    config_keys,
    default_config_path,
    flatten,
    load_toml,
)
from engine.data import PlanError
from engine.plan import check_imitation

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CLASSES = ("circle", "square", "star")


def photo_shards(root: Path, width_px: int, height_px: int) -> Path:
    """A user's small photo folder (12 train, 6 val images, 3 classes), converted by `make-shards folder`."""
    images = root / "photos"
    images.mkdir(parents=True)
    rows: dict[str, list[str]] = {"train": [], "val": []}
    for index in range(18):
        (images / f"{index:02d}.jpg").write_bytes(image_bytes(width_px, height_px, seed=index))
        rows["train" if index < 12 else "val"].append(f"{index:02d}.jpg,{CLASSES[index % 3]}")
    shards = root / "shards"
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("path,label\n" + "\n".join(lines) + "\n")
        args = ["--images", str(images), "--labels", str(root / f"{split}.csv"), "--split", split]
        converted = run_in_process("shards.cli", "folder", *args, "--out", str(shards), "--workers", "1")
        assert converted.returncode == 0, converted.stderr
    return shards


@pytest.fixture(scope="module")
def small_photos(tmp_path_factory) -> Path:
    """Photos of 64 x 48 px: the data's own size, 48 px, is under 224."""
    return photo_shards(tmp_path_factory.mktemp("small"), 64, 48)


@pytest.fixture(scope="module")
def large_photos(tmp_path_factory) -> Path:
    return photo_shards(tmp_path_factory.mktemp("large"), 320, 256)


def printed_config(*args: str) -> dict:
    """``engine-run ARGS --print-config`` as flat ``{"section.key": value}``."""
    result = run_cli_in_process(*args, "--print-config")
    assert result.returncode == 0, result.stderr
    return flatten(tomllib.loads(result.stdout), "printed")


GRID = flatten(load_toml(default_config_path()), "grid")
DEFAULTS = flatten(RunConfig().to_json(), "defaults")
GRID_ONLY = {name: value for name, value in GRID.items() if value != DEFAULTS[name]}  # the grid's own settings


def test_print_config_on_a_small_photo_folder_shows_no_digit_grid_value(small_photos: Path) -> None:
    printed = printed_config("--data", str(small_photos))
    assert {name: printed[name] for name in GRID_ONLY if printed[name] == GRID[name]} == {}
    assert printed["arch"] == "resnet18" and printed["data.augment"] is True and printed["data.num_workers"] == -1
    assert printed["data.image_size_px"] == 48  # the data's own size, not shrunk to 24 nor blown up to 224
    assert (printed["method.warmup_steps"], printed["num_steps"], printed["optim.lr_per_256"]) == (0, 3000, 0.1)


def test_large_photos_get_224_px_and_the_digit_grid_keeps_its_own_settings(large_photos: Path, grid_root: Path) -> None:
    assert printed_config("--data", str(large_photos))["data.image_size_px"] == 224
    for args in ((), ("--data", str(grid_root))):  # the embedded grid, and a folder holding the grid
        printed = printed_config(*args)
        assert {name: printed[name] for name in GRID_ONLY if name != "data.root"} == {
            name: value for name, value in GRID_ONLY.items() if name != "data.root"
        }, args


def test_flags_and_files_win_over_the_base_the_data_chooses(small_photos: Path, tmp_path: Path) -> None:
    (tmp_path / "mine.toml").write_text('arch = "resnet50"\n[data]\nimage_size_px = 40\n')
    printed = printed_config("--data", str(small_photos), "--config", str(tmp_path / "mine.toml"), "--workers", "2")
    assert (printed["arch"], printed["data.image_size_px"], printed["data.num_workers"]) == ("resnet50", 40, 2)


def test_help_shows_the_defaults_a_run_on_own_data_uses(large_photos: Path) -> None:
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    printed = printed_config("--data", str(large_photos))
    for key in config_keys():
        if key.name != "data.root":
            assert f"[key: {key.name}; default: {help_value(printed[key.name])}" in text, key.name
    assert "[key: method.warmup_steps; default: 0; digit grid: 400]" in text
    assert "[key: arch; default: 'resnet18'; digit grid: 'grid_cnn']" in text


def test_the_log_first_says_where_each_non_default_value_came_from(
    small_photos: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "mine.toml").write_text("[optim]\nlr_per_256 = 0.05\n")
    flags = ["--data", str(small_photos), "--config", str(tmp_path / "mine.toml"), "--method", "sigmoid"]
    flags += ["--steps", "1", "--batch-size", "4", "--eval-every", "1", "--out", str(tmp_path / "run")]
    flags += CPU_FLAGS
    with caplog.at_level(logging.INFO):
        result = run_cli_in_process(*flags)
    assert result.returncode == 0, result.stderr[-3000:]
    messages = [record.getMessage() for record in caplog.records]
    first = messages.index(next(m for m in messages if m.startswith("config:")))
    assert first == 0, messages[:3]
    lines = {line.split("=")[0].strip(): line for line in messages[1:8]}
    assert lines["optim.lr_per_256"].endswith(f"(--config {tmp_path / 'mine.toml'})")
    assert lines["method.name"].endswith("(flag --method)") and lines["num_steps"].endswith("(flag --steps)")
    assert "data (" in lines["data.image_size_px"] and "48 px" in lines["data.image_size_px"]
    assert "arch" not in lines  # resnet18 is the default: not listed


# -- MILe must imitate ---------------------------------------------------------------------------


def test_mile_that_never_reaches_an_imitation_phase_is_refused_at_start(grid_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = [*CPU_FLAGS, "--out", str(out)]
    result = run_cli_in_process("--data", str(grid_root), "--method", "mile", "--steps", "300", *flags)
    assert result.returncode == 2, result.stderr
    message = result.stderr
    for part in ("never imitates", "num_steps (--steps) 300", "(--warmup-steps) 400", "(--k-teacher-steps) 100"):
        assert part in message, part
    assert "(--k-student-steps) 100" in message and "--steps 600 or more" in message
    assert "Traceback" not in message and not (out / "metrics.jsonl").exists()


def test_a_mile_run_that_ends_in_a_teacher_phase_is_warned_with_the_steps_that_would_not(
    grid_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flags = [*CPU_FLAGS, "--out", str(tmp_path / "run")]
    flags += ["--warmup-steps", "0", "--k-teacher-steps", "3", "--k-student-steps", "2", "--batch-size", "32"]
    with caplog.at_level(logging.WARNING):
        result = run_cli_in_process("--data", str(grid_root), "--steps", "7", "--eval-every", "7", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--method mile" in r.getMessage()
    ]
    assert len(warnings) == 1 and "ends in an interaction (teacher) phase at step 7" in warnings[0], warnings
    assert "--steps 5 or 10 ends it right after an imitation phase" in warnings[0]


def test_runs_that_end_after_an_imitation_phase_or_resume_are_not_refused(caplog: pytest.LogCaptureFixture) -> None:
    mile = MethodConfig(name=Method.MILE, k_teacher_steps=3, k_student_steps=2)
    grid, defaults = build_config(load_toml(default_config_path()), {}), RunConfig()
    with caplog.at_level(logging.WARNING):
        check_imitation(mile, 10)  # teacher 0-2, student 3-4, teacher 5-7, student 8-9
        check_imitation(grid.method, grid.num_steps)  # the grid's 2000 steps and the defaults' 3000 end so
        check_imitation(defaults.method, defaults.num_steps)
        check_imitation(MethodConfig(name=Method.SIGMOID, warmup_steps=50), 3)  # only MILe has phases
    assert caplog.records == []
    with pytest.raises(PlanError, match="never imitates"):
        check_imitation(mile, 3)
    with caplog.at_level(logging.WARNING):
        check_imitation(mile, 3, resume=True)  # a resumed run has trained already: warned, not refused
    assert "never imitates" in caplog.text


@pytest.mark.parametrize(
    "recipe", sorted((default_config_path().parent / "paper").glob("*.toml")), ids=lambda p: p.stem
)
def test_every_paper_recipe_ends_right_after_an_imitation_phase(recipe: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = build_config(load_toml(recipe), {})
    with caplog.at_level(logging.WARNING):
        check_imitation(config.method, config.num_steps)  # raises when the recipe would never imitate
    assert caplog.records == [], caplog.text
