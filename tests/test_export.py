"""After training: mile-export writes a self-contained model folder, mile-predict labels images exactly
as the run's evaluation would, mile-eval reproduces the run's summary metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CPU, CPU_FLAGS, REPO, tiny_config
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


def invoke(app, *args: str | Path) -> str:
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
        *CPU_FLAGS,
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
    assert lines[0] == "image,labels,topk,skipped" and len(lines) == 3
    assert lines[1].split(",")[0] == str(jpeg) and lines[1].split(",")[2].count(":") == 5


def test_without_safetensors_the_export_is_a_torch_state_dict(trained, tmp_path: Path, monkeypatch) -> None:
    run, _, _ = trained
    monkeypatch.setattr(export, "safetensors_available", lambda: False)
    export.export_run(run, tmp_path / "model")
    assert (tmp_path / "model" / "model.pt").is_file() and not (tmp_path / "model" / "model.safetensors").exists()
    state = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    meta, model = export.load_exported(tmp_path / "model", torch.device("cpu"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.slow
def test_errors_are_one_line_naming_the_path(trained, tmp_path: Path) -> None:
    _, model_dir, _ = trained
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    cases = [
        (
            ["engine.commands.predict", "--model", str(tmp_path), str(tmp_path / "bad.jpg")],
            "is not an exported model folder (no model.json)",
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


def huge_png_header(path: Path, side_px: int = 30000) -> Path:
    """A PNG whose header claims ``side_px``² pixels, with almost no data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side_px, side_px, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def run_predict(model_dir: Path, *args: Path | str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "engine.commands.predict",
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        *map(str, args),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_predict_skips_unreadable_files_and_lists_them(trained, grid_root: Path, tmp_path: Path) -> None:
    _, model_dir, _ = trained
    good = val_jpegs(grid_root, tmp_path / "images", 3)
    bad = tmp_path / "images" / "001b_bad.jpg"
    bad.write_bytes(b"not an image at all")
    huge = huge_png_header(tmp_path / "images" / "002b_huge.png")
    result = run_predict(model_dir, tmp_path / "images", "--out", tmp_path / "preds.jsonl")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [row["image"] for row in rows] == [str(good[0]), str(good[1]), str(bad), str(good[2]), str(huge)]
    by_image = {row["image"]: row for row in rows}
    assert all("labels" in by_image[str(path)] and "skipped" not in by_image[str(path)] for path in good)
    assert "undecodable" in by_image[str(bad)]["skipped"]
    assert "decompression bomb" in by_image[str(huge)]["skipped"]
    assert f"skipping {bad}" in result.stderr and f"skipping {huge}" in result.stderr
    assert "skipped 2 of 5 images" in result.stderr and "Traceback" not in result.stderr

    # nothing predictable: the output still lists why, and the command fails
    result = run_predict(model_dir, bad, huge, "--out", tmp_path / "none.csv")
    assert result.returncode == 1 and "none of the 2 images could be read" in result.stderr, result.stderr
    lines = (tmp_path / "none.csv").read_text().splitlines()
    assert lines[0] == "image,labels,topk,skipped" and len(lines) == 3 and "Traceback" not in result.stderr


def test_model_json_says_whose_architecture_and_every_preprocessing_step(trained) -> None:
    _, model_dir, method = trained
    meta = json.loads((model_dir / "model.json").read_text())
    arch = meta["architecture"]
    assert arch["name"] == "grid_cnn" and arch["source"].startswith("this project")
    assert arch["defined_in"] == "engine/models.py, class GridCNN" and any(
        "Conv2d(3, 24" in line for line in arch["layers"]
    )
    steps = meta["preprocessing"]
    assert steps["resize"]["interpolation"] == "bilinear" and steps["resize"]["antialias"] is True
    assert (
        steps["resize"]["shorter_side_px"] == 24
        and steps["crop"]["kind"] == "centre"
        and steps["crop"]["size_px"] == 24
    )
    assert steps["channel_order"] == "RGB" and "255" in steps["value_range"]
    assert steps["mean"] == meta["mean"] and steps["std"] == meta["std"]
    assert meta["outputs"]["probabilities"].startswith("softmax" if method == "softmax" else "sigmoid")


def standalone_inputs(meta: dict, paths: list[Path]):
    """The network's input batch made from model.json's preprocessing alone (not this project's code)."""
    import numpy as np
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as F

    steps, batch = meta["preprocessing"], []
    shorter, size = steps["resize"]["shorter_side_px"], steps["crop"]["size_px"]
    for path in paths:
        image = decode_image(str(path), mode=ImageReadMode.RGB)
        height, width = image.shape[-2:]
        long_px = lambda long, short: int(long * shorter / short + 0.5)  # noqa: E731 (the recorded rule)
        new = (shorter, long_px(width, height)) if height <= width else (long_px(height, width), shorter)
        image = F.resize(image, list(new), antialias=True)  # bilinear, as recorded
        top, left = (image.shape[-2] - size + 1) // 2, (image.shape[-1] - size + 1) // 2
        pixels = image[:, top : top + size, left : left + size].float().numpy() / 255.0
        mean, std = np.array(steps["mean"]).reshape(3, 1, 1), np.array(steps["std"]).reshape(3, 1, 1)
        batch.append(((pixels - mean) / std).astype(np.float32))
    return np.stack(batch)


def test_onnx_export_predicts_as_mile_predict(trained, grid_root: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    import numpy as np

    run, _, method = trained
    printed = invoke(export.app, run, "--out", tmp_path / "model", "--onnx")
    assert "model.onnx" in printed
    onnx.checker.check_model(str(tmp_path / "model" / "model.onnx"))
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["onnx"]["file"] == "model.onnx"
    images = val_jpegs(grid_root, tmp_path / "images", NUM_IMAGES)
    num_classes = meta["num_classes"]
    printed = invoke(
        predict.app,
        "--model",
        tmp_path / "model",
        *images,
        "--theta",
        str(THETA),
        "--topk",
        str(num_classes),
        "--device",
        "cpu",
    )
    rows = [json.loads(line) for line in printed.splitlines()]

    session = ort.InferenceSession(str(tmp_path / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": standalone_inputs(meta, images)})
    if method == "softmax":
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
    else:
        probs = 1.0 / (1.0 + np.exp(-logits))
    names = meta["class_names"]
    for row, p in zip(rows, probs):
        predicted = {t["class"]: t["probability"] for t in row["topk"]}
        assert [predicted[name] for name in names] == pytest.approx(p.tolist(), abs=1e-4)
        chosen = {int(p.argmax())} | (set() if method == "softmax" else set(np.flatnonzero(p > THETA).tolist()))
        assert row["labels"] == [names[c] for c in sorted(chosen)]


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"std": [0.2, 0.0, 0.2]}, "std"),
        ({"method": "softmaxx"}, "method"),
        ({"image_size_px": 100000}, "image_size_px"),
        ({"eval_crop_fraction": 0}, "eval_crop_fraction"),
        ({"class_names": ["a", "b"]}, "class_names"),
        ({"num_classes": 11, "class_names": [str(c) for c in range(11)]}, "num_classes"),
        ({"default_theta": 2}, "default_theta"),
    ],
)
def test_an_edited_model_json_is_refused_naming_the_key(trained, tmp_path: Path, edit: dict, key: str) -> None:
    import shutil

    _, model_dir, _ = trained
    shutil.copytree(model_dir, tmp_path / "model")
    meta = json.loads((model_dir / "model.json").read_text())
    (tmp_path / "model" / "model.json").write_text(json.dumps({**meta, **edit}))
    with pytest.raises(export.ExportError) as refused:
        export.load_exported(tmp_path / "model", torch.device("cpu"))
    message = str(refused.value)
    assert "\n" not in message and str(tmp_path / "model" / "model.json") in message and f"key {key!r}" in message
    if key == "mean":  # through the command: one line on stderr, exit status 2
        (tmp_path / "one.jpg").write_bytes(b"")  # never read: model.json is checked first
        result = run_predict(tmp_path / "model", tmp_path / "one.jpg")
        assert result.returncode == 2 and result.stderr.strip() == f"error: {message}", result.stderr


def test_rescoring_a_run_needs_only_its_eval_split(grid_root: Path, tmp_path: Path) -> None:
    # The report re-scores a finished run on its eval split (eval_outputs); the outputs' classes come
    # from the checkpoint's class record, so a train split deleted after training is not needed.
    data = tmp_path / "grid"
    shutil.copytree(grid_root, data)
    run = tmp_path / "run"
    Trainer(tiny_config(data, run, num_steps=6, eval_every=6), CPU).run()
    shutil.rmtree(data / "train")
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["splits"]["train"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    outputs = eval_outputs(run)
    assert outputs.logits.shape == (load_split(data, "val").num_samples, 10)
