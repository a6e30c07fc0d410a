"""After training: mile-export writes a self-contained model folder, mile-predict labels images exactly
as the run's evaluation would, mile-eval reproduces the run's summary metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_engine_run import CPU, REPO, grid_root, tiny_config  # noqa: F401 (grid_root is a fixture)
from typer.testing import CliRunner

from engine.commands import evaluate, export, predict
from engine.metrics import prediction_sets
from engine.scoring import eval_outputs
from engine.trainer import Trainer
from pipelines.sample_table import ShardReader, build_sample_table
from shards.manifest import load_split

runner = CliRunner()
NUM_IMAGES = 12
THETA = 0.075


def invoke(app, *args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.stdout


@pytest.fixture(scope="module", params=["mile", "softmax"])
def trained(request, grid_root: Path, tmp_path_factory) -> tuple[Path, Path, str]:
    """(run folder, exported model folder, method) of a tiny digit-grid run."""
    run = tmp_path_factory.mktemp(f"run_{request.param}")
    Trainer(tiny_config(grid_root, run / "run", **{"method.name": request.param}), CPU).run()
    invoke(export.app, run / "run", "--out", run / "model")
    return run / "run", run / "model", request.param


def val_jpegs(root: Path, out: Path, count: int) -> list[Path]:
    """The first ``count`` val images (file order, as the eval loader reads them) as JPEG files."""
    table = build_sample_table(root, load_split(root, "val"))
    reader = ShardReader(table)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = out / f"{index:03d}.jpg"
        path.write_bytes(bytes(reader.image_bytes(index)))
        paths.append(path)
    reader.close()
    return paths


def test_export_writes_weights_and_the_models_description(trained, grid_root: Path) -> None:
    run, model_dir, method = trained
    assert (model_dir / "model.safetensors").is_file() and not (model_dir / "model.pt").exists()
    meta = json.loads((model_dir / "model.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert meta["arch"] == "grid_cnn" and meta["num_classes"] == 10 and meta["method"] == method
    assert meta["class_names"] == load_split(grid_root, "train").class_names
    assert meta["image_size_px"] == 24 and meta["eval_crop_fraction"] == 1.0
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert meta["default_theta"] == 0.25 and meta["step"] == 12
    assert meta["metrics"] == {k: v for k, v in summary.items() if k not in ("step", "method")}


def test_predicted_label_sets_agree_with_the_runs_evaluation(trained, grid_root: Path, tmp_path: Path) -> None:
    run, model_dir, method = trained
    images = val_jpegs(grid_root, tmp_path / "images", NUM_IMAGES)
    # a threshold among the barely trained model's sigmoids (~0.07-0.1): sets of one and of several classes
    invoke(
        predict.app,
        "--model",
        model_dir,
        tmp_path / "images",
        "--theta",
        str(THETA),
        "--topk",
        "3",
        "--out",
        tmp_path / "preds.jsonl",
        "--device",
        "cpu",
    )
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [row["image"] for row in rows] == [str(p) for p in images]

    outputs = eval_outputs(run)  # the run's own evaluation pass over val, in file order
    logits = outputs.logits[:NUM_IMAGES]
    names = load_split(grid_root, "train").class_names
    kind = "softmax" if method == "softmax" else "sigmoid"
    expected = prediction_sets(logits, THETA, kind)
    assert [row["labels"] for row in rows] == [[names[c] for c in row.nonzero().flatten().tolist()] for row in expected]
    sizes = {len(row["labels"]) for row in rows}
    assert sizes == {1} if method == "softmax" else len(sizes) > 1, sizes
    probs = logits.softmax(dim=1) if method == "softmax" else torch.sigmoid(logits)
    for row, p in zip(rows, probs):
        top = p.topk(3)
        assert [t["class"] for t in row["topk"]] == [names[c] for c in top.indices.tolist()]
        assert [t["probability"] for t in row["topk"]] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_mile_eval_reproduces_the_runs_summary(trained, grid_root: Path, tmp_path: Path) -> None:
    run, model_dir, _ = trained
    printed = invoke(
        evaluate.app,
        "--model",
        model_dir,
        "--data",
        grid_root,
        "--split",
        "val",
        "--loader",
        "torch",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--batch-size",
        "32",
        "--out",
        tmp_path / "m.json",
    )
    metrics = json.loads(printed)
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    summary = json.loads((run / "summary.json").read_text())
    assert metrics["split"] == "val"
    for key, value in summary.items():
        if key not in ("step", "method"):
            assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert "top1" in summary and "f1@0.25" in summary


def test_predict_writes_csv_and_accepts_png_files(trained, grid_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    _, model_dir, _ = trained
    jpeg = val_jpegs(grid_root, tmp_path / "images", 1)[0]
    png = tmp_path / "one.png"
    Image.open(jpeg).save(png)
    invoke(predict.app, "--model", model_dir, jpeg, png, "--out", tmp_path / "preds.csv", "--device", "cpu")
    lines = (tmp_path / "preds.csv").read_text().splitlines()
    assert lines[0] == "image,labels,topk" and len(lines) == 3
    assert lines[1].split(",")[0] == str(jpeg) and lines[1].split(",")[2].count(":") == 5


def test_without_safetensors_the_export_is_a_torch_state_dict(trained, tmp_path: Path, monkeypatch) -> None:
    run, _, _ = trained
    monkeypatch.setattr(export, "safetensors_available", lambda: False)
    export.export_run(run, tmp_path / "model")
    assert (tmp_path / "model" / "model.pt").is_file() and not (tmp_path / "model" / "model.safetensors").exists()
    state = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    meta, model = export.load_exported(tmp_path / "model", torch.device("cpu"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_errors_are_one_line_naming_the_path(trained, tmp_path: Path) -> None:
    _, model_dir, _ = trained
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    cases = [
        (
            ["engine.commands.predict", "--model", str(tmp_path), str(tmp_path / "bad.jpg")],
            "is not an exported model folder (no model.json)",
        ),
        (
            ["engine.commands.predict", "--model", str(model_dir), str(tmp_path / "bad.jpg"), "--device", "cpu"],
            "bad.jpg cannot be decoded",
        ),
        (["engine.commands.predict", "--model", str(model_dir), str(tmp_path / "nothing")], "nothing does not exist"),
        (
            ["engine.commands.export", str(tmp_path / "norun"), "--out", str(tmp_path / "m")],
            "config.toml does not exist",
        ),
    ]
    for args, message in cases:
        result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=REPO)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
