"""Several eval sets in one run: ``--eval-data DIR[:SPLIT]`` scores each set at every eval point into
its own ``NAME/metric`` keys, refuses sets with other classes, and mile-eval agrees with the run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from helpers import CPU, CPU_FLAGS, run_cli_in_process, run_in_process, tiny_config
from typer.testing import CliRunner

from engine.commands import evaluate, export
from engine.commands.run import check_resume_changes
from engine.config import ConfigError
from engine.run_folder import read_metrics
from engine.trainer import Trainer
from shards.sources import digits_grid
from shards.writer import WriterSettings, write_split


@pytest.fixture(scope="module")
def second_grid(tmp_path_factory) -> Path:
    """Another converted digit grid (other seed, other images), the same ten classes: folder ``grid2``."""
    root = tmp_path_factory.mktemp("second") / "grid2"
    config = digits_grid.GridConfig(train_size=64, val_size=48, tune_size=40, seed=11)
    items = digits_grid.grid_items(config)
    for split in ("val", "tune"):
        write_split(root, digits_grid.grid_spec(split, config), items[split], WriterSettings(progress=False))
    return root


def reordered_classes(source: Path, destination: Path) -> Path:
    """A copy of ``source`` whose manifest lists the classes in another order (as a converter run
    without the train split's class list would)."""
    shutil.copytree(source, destination)
    manifest = json.loads((destination / "manifest.json").read_text())
    names = manifest["splits"]["val"]["class_names"]
    names[3], names[4] = names[4], names[3]
    (destination / "manifest.json").write_text(json.dumps(manifest))
    return destination


def test_extra_eval_sets_are_scored_at_every_eval_point_and_match_mile_eval(
    grid_root: Path, second_grid: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = run_cli_in_process(
        "--data",
        str(grid_root),
        "--out",
        str(out),
        *CPU_FLAGS,
        "--steps",
        "8",
        "--batch-size",
        "32",
        "--eval-every",
        "4",
        "--log-every",
        "4",
        "--warmup-steps",  # the grid's 400 would leave MILe no imitation phase in 8 steps
        "0",
        "--k-teacher-steps",
        "2",
        "--k-student-steps",
        "2",
        "--eval-data",
        str(second_grid),
        "--eval-data",
        f"{second_grid}:tune",
        "--best-metric",
        "grid2/tune/lrap",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8]
    for record in evals:
        assert (
            record["num_images"] == 160
            and record["grid2/val/num_images"] == 48
            and record["grid2/tune/num_images"] == 40
        )
        assert {
            "top1",
            "f1@0.25",
            "grid2/val/f1@0.25",
            "grid2/tune/lrap",
            "eval_seconds",
            "grid2/val/eval_seconds",
        } <= set(record)
    summary = json.loads((out / "summary.json").read_text())
    assert {k: v for k, v in evals[-1].items() if k in summary} == {k: summary[k] for k in summary if k in evals[-1]}
    assert "grid2/val/top1" in summary and "grid2/tune/f1@matched" in summary
    assert (out / "checkpoints" / "best.pt").is_file()

    CliRunner().invoke(export.app, [str(out), "--out", str(tmp_path / "model")], catch_exceptions=False)
    for split in ("val", "tune"):
        scored = evaluate.evaluate_exported(
            tmp_path / "model", second_grid, split, CPU.device, batch_size=32, backend="torch", num_workers=0
        )
        for key, value in scored.items():
            assert summary[f"grid2/{split}/{key}"] == pytest.approx(value, abs=1e-6), key

    # the report gives each extra set's top-1 a column of its own
    report = run_in_process("tools/report.py", str(out), "--out", str(tmp_path / "report"), "--no-score-models")
    assert report.returncode == 0, report.stderr[-3000:]
    row = next(csv.DictReader(open(tmp_path / "report" / "table.csv")))
    assert (
        row["grid2/val top-1"] == f"{100 * summary['grid2/val/top1']:.2f}"
        and row["grid2/tune top-1"] == f"{100 * summary['grid2/tune/top1']:.2f}"
    )


def test_an_eval_set_with_other_classes_is_refused_naming_both_manifests_and_the_converter_option(
    grid_root: Path, second_grid: Path, tmp_path: Path
) -> None:
    other = reordered_classes(second_grid, tmp_path / "reordered")
    config = tiny_config(grid_root, tmp_path / "run", **{"data.extra_eval": [str(other)]})
    with pytest.raises(ConfigError) as error:
        Trainer(config, CPU)
    message = str(error.value)
    assert str(other / "manifest.json") in message and str(grid_root / "manifest.json") in message
    assert "class index 3: '4' vs '3'" in message and "--class-list" in message and "--write-class-list" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{tmp}/no_such_folder", "no_such_folder does not exist"),
        ("{second}:no_such_split", "has no split 'no_such_split'"),
    ],
)
def test_a_missing_eval_folder_or_split_fails_before_any_file_is_written(
    grid_root: Path, second_grid: Path, tmp_path: Path, spec: str, message: str
) -> None:
    result = run_cli_in_process(
        "--data",
        str(grid_root),
        "--out",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--loader",
        "torch",
        "--eval-data",
        spec.format(tmp=tmp_path, second=second_grid),
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--eval-data" in result.stderr and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_best_metric_must_name_a_key_of_an_eval_set(grid_root: Path, second_grid: Path, tmp_path: Path) -> None:
    config = tiny_config(
        grid_root,
        tmp_path / "run",
        **{"data.extra_eval": [str(second_grid)], "checkpoint.best_metric": "grid2/tune/lrap"},
    )
    with pytest.raises(ConfigError, match="grid2/val/lrap"):
        Trainer(config, CPU)


def test_two_sets_of_one_name_get_unique_names_and_an_added_set_may_resume(
    grid_root: Path, second_grid: Path, tmp_path: Path
) -> None:
    config = tiny_config(grid_root, tmp_path / "run", **{"data.extra_eval": [str(second_grid), f"{second_grid}:val"]})
    trainer = Trainer(config, CPU)
    try:
        assert [s.name for s in trainer.eval_sets] == ["", "grid2/val", "grid2/val-2"]
    finally:
        for loader in (trainer.train_loader, *trainer.eval_loaders):
            loader.close()
    check_resume_changes(tiny_config(grid_root, tmp_path / "run"), config)  # adding eval sets is no other experiment


@pytest.mark.parametrize(
    "spec, folder, split",
    [
        ("shards/imagenet", "shards/imagenet", "val"),
        ("shards/imagenet:tune", "shards/imagenet", "tune"),
        ("/data/a:b/c", "/data/a:b/c", "val"),  # a colon followed by a path belongs to the folder
    ],
)
def test_eval_data_names_a_folder_and_a_split(spec: str, folder: str, split: str) -> None:
    from engine.plan import parse_eval_data

    assert parse_eval_data(spec) == (Path(folder), split)
