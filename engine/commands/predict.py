"""``mile-predict --model DIR IMAGES...``: an exported model's top-k classes and label set per image.

Images (JPEG or PNG files, or folders of them) are preprocessed exactly as evaluation does it
(``pipelines/transforms.py``: resize the shorter side to size / fraction, centre crop, normalise),
so a shard's image scores here as it did in the run's evaluation. The label set is the prediction
set that the metrics score (docs/DESIGN.md, "Metrics"): argmax ∪ {c : sigmoid(z_c) > theta} for
sigmoid-trained models (MILe too), the argmax alone for softmax, {sigmoid > theta} for attributes.
Probabilities are sigmoids, or softmax for softmax-trained models.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import typer
from torch import nn
from torchvision.io import ImageReadMode, decode_image

from engine.commands.export import ExportedModel, ExportError, autocast_dtype, load_exported
from engine.commands.runner import run_cli
from engine.distributed import resolve_device
from engine.metrics import prediction_sets
from engine.steps import autocast_context
from pipelines.contract import LoaderConfig
from pipelines.torch_backend import normalisation, normalise
from pipelines.transforms import TransformSpec, transform_image, transform_spec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Prediction:
    image: str
    topk: list[tuple[str, float]]  # (class name, probability), most probable first
    labels: list[str]  # the prediction set, by class name, in class order

    def to_json(self) -> dict:
        return {
            "image": self.image,
            "labels": self.labels,
            "topk": [{"class": name, "probability": p} for name, p in self.topk],
        }


def image_files(inputs: list[Path]) -> list[Path]:
    """The images named: files as given, folders searched recursively for JPEG/PNG files (sorted)."""
    found: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise ExportError(f"image {path} does not exist")
    if not found:
        raise ExportError(f"no JPEG or PNG images in {', '.join(str(p) for p in inputs)}")
    return found


def eval_transform(meta: ExportedModel) -> TransformSpec:
    """The evaluation preprocessing of the run, from ``model.json``."""
    config = LoaderConfig(image_size_px=meta.image_size_px, train=False, eval_crop_fraction=meta.eval_crop_fraction)
    return transform_spec(config)


def load_image(path: Path, spec: TransformSpec) -> torch.Tensor:
    """One file -> uint8 H×W×C after the eval resize and centre crop."""
    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as error:  # torchvision reports decoder failures as RuntimeError
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ExportError(f"image {path} cannot be decoded ({first_line})") from None
    return transform_image(image, spec, None).permute(1, 2, 0)


def batches(paths: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


@torch.no_grad()
def predict_images(
    model: nn.Module,
    meta: ExportedModel,
    paths: list[Path],
    theta: float,
    topk: int,
    device: torch.device,
    batch_size: int = 64,
) -> list[Prediction]:
    spec = eval_transform(meta)
    scale, bias = normalisation(tuple(meta.mean), tuple(meta.std), device)
    dtype = autocast_dtype(meta, device)
    predictions: list[Prediction] = []
    for chunk in batches(paths, batch_size):
        images = torch.stack([load_image(path, spec) for path in chunk]).to(device)
        with autocast_context(dtype, device.type):
            logits = model(normalise(images, scale, bias, dtype or torch.float32)).float()
        predictions += describe(logits, meta, chunk, theta, topk)
    return predictions


def describe(logits: torch.Tensor, meta: ExportedModel, paths: list[Path], theta: float, topk: int) -> list[Prediction]:
    """Top-k (class name, probability) and the prediction set of each row of ``logits``."""
    probs = logits.softmax(dim=1) if meta.method_kind == "softmax" else torch.sigmoid(logits)
    sets = prediction_sets(logits, theta, meta.method_kind, meta.attributes).cpu()
    top = probs.topk(min(topk, meta.num_classes), dim=1)
    out = []
    for row, path in enumerate(paths):
        best = [(meta.class_names[c], float(p)) for p, c in zip(top.values[row].tolist(), top.indices[row].tolist())]
        labels = [meta.class_names[c] for c in sets[row].nonzero().flatten().tolist()]
        out.append(Prediction(str(path), best, labels))
    return out


def write_predictions(predictions: list[Prediction], out: Optional[Path]) -> None:
    """JSON lines (stdout, or ``out``.jsonl), or CSV where ``out`` ends in .csv."""
    if out is not None and out.suffix.lower() == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["image", "labels", "topk"])
        for p in predictions:
            writer.writerow([p.image, ";".join(p.labels), ";".join(f"{name}:{prob:.6g}" for name, prob in p.topk)])
        text = buffer.getvalue()
    else:
        text = "".join(json.dumps(p.to_json()) + "\n" for p in predictions)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def predict(
    images: list[Path] = typer.Argument(..., help="JPEG/PNG files or folders of them (searched recursively)."),
    model: Path = typer.Option(..., "--model", help="An exported model folder (mile-export)."),
    theta: Optional[float] = typer.Option(
        None,
        "--theta",
        min=0.0,
        max=1.0,
        help="Label-set threshold on sigmoid(z); default: the run's first eval theta.",
    ),
    topk: int = typer.Option(5, "--topk", min=1, help="Most probable classes listed per image."),
    out: Optional[Path] = typer.Option(None, "--out", help="preds.jsonl or preds.csv; default: JSON lines on stdout."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available) | cpu | cuda | cuda:N."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass."),
) -> None:
    """Predict top-k classes and the thresholded label set of each image with an exported model."""
    target = resolve_device(device)
    meta, network = load_exported(model, target)
    chosen = meta.default_theta if theta is None else theta
    write_predictions(predict_images(network, meta, image_files(images), chosen, topk, target, batch_size), out)


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
