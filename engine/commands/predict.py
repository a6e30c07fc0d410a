"""``mile-predict --model DIR IMAGES...``: an exported model's top-k classes and label set per image.

Images (JPEG or PNG files, or folders of them) are preprocessed exactly as evaluation does it
(``pipelines/transforms.py``: resize the shorter side to size / fraction, centre crop, normalise),
so a shard's image scores here as it did in the run's evaluation. The label set is the prediction
set that the metrics score (docs/DESIGN.md, "Metrics"): argmax ∪ {c : sigmoid(z_c) > theta} for
sigmoid-trained models (MILe too), the argmax alone for softmax, {sigmoid > theta} for attributes.
Probabilities are sigmoids, or softmax for softmax-trained models.

A file that cannot be read as an image (damaged, not an image, or a header claiming more pixels than
Pillow's decompression-bomb limit, the converter's limit too) is skipped with a warning and listed
in the output with the reason; the command fails (exit status 1) only when no image could be predicted.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import typer
from torch import nn
from torchvision.io import ImageReadMode, decode_jpeg

from engine.commands.export import ExportedModel, ExportError, autocast_dtype, load_exported
from engine.commands.runner import check_out_file, run_cli
from engine.distributed import resolve_device
from engine.metrics import prediction_sets
from engine.options import BATCH_SIZE, DEVICE, MODEL, OUT, THETA
from engine.steps import autocast_context
from pipelines.transforms import TransformSpec, normalisation, normalise, transform_image, transform_spec
from shards.command_options import command_app
from shards.images import ImagePolicy, UnreadableImage, sanitize

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    image: str
    topk: list[tuple[str, float]]  # (class name, probability), most probable first
    labels: list[str]  # the prediction set, by class name, in class order
    skipped: str | None = None  # why the image could not be predicted (then topk and labels are empty)

    def to_json(self) -> dict:
        if self.skipped is not None:
            return {"image": self.image, "skipped": self.skipped}
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
    return transform_spec(meta.eval_loader_config())


def load_image(path: Path, spec: TransformSpec) -> torch.Tensor:
    """One file -> uint8 H×W×C after the eval resize and centre crop; ``UnreadableImage`` if it is none.
    The file becomes the JPEG ``make-shards`` would store for it (``shards.images.sanitize``: EXIF
    orientation, bit depth, transparency, first frame, the decompression-bomb guard), decoded as the
    loaders decode shards, so an image scores here as its shard does."""
    try:
        stored = sanitize(path.read_bytes(), ImagePolicy()).jpeg
        image = decode_jpeg(torch.frombuffer(bytearray(stored), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except OSError as error:
        raise UnreadableImage(f"cannot be read ({error.strerror or error})") from None
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
        loaded, skipped = load_images(chunk, spec)
        if loaded:
            images = torch.stack(list(loaded.values())).to(device)
            with autocast_context(dtype, device.type):
                logits = model(normalise(images, scale, bias, dtype or torch.float32)).float()
            done = dict(zip(loaded, describe(logits, meta, list(loaded), theta, topk)))
        else:
            done = {}
        predictions += [done[path] if path in done else Prediction(str(path), [], [], skipped[path]) for path in chunk]
    return predictions


def load_images(paths: list[Path], spec: TransformSpec) -> tuple[dict[Path, torch.Tensor], dict[Path, str]]:
    """The images of ``paths`` that decode, and why each of the others was skipped (warned about)."""
    loaded: dict[Path, torch.Tensor] = {}
    skipped: dict[Path, str] = {}
    for path in paths:
        try:
            loaded[path] = load_image(path, spec)
        except UnreadableImage as error:
            skipped[path] = str(error)
            log.warning("skipping %s: %s", path, error)
    return loaded, skipped


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
        writer.writerow(["image", "labels", "topk", "skipped"])
        for p in predictions:
            topk = ";".join(f"{name}:{prob:.6g}" for name, prob in p.topk)
            writer.writerow([p.image, ";".join(p.labels), topk, p.skipped or ""])
        text = buffer.getvalue()
    else:
        text = "".join(json.dumps(p.to_json()) + "\n" for p in predictions)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")


app = command_app()


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="JPEG/PNG files or folders of them (searched recursively)."),
    model: Path = MODEL.option(),
    theta: Optional[float] = THETA.option(
        default=None, help="Label-set threshold on sigmoid(z); default: the run's first eval theta."
    ),
    topk: int = typer.Option(5, "--topk", min=1, help="Most probable classes listed per image."),
    out: Optional[Path] = OUT.option(default=None, help="preds.jsonl or preds.csv; default: JSON lines on stdout."),
    device: str = DEVICE.option(),
    batch_size: int = BATCH_SIZE.option(default=64, help="Images per forward pass."),
) -> None:
    """Predict top-k classes and the thresholded label set of each image with an exported model."""
    if out is not None:
        check_out_file(out)
    target = resolve_device(device)
    meta, network = load_exported(model, target)
    chosen = meta.default_theta if theta is None else theta
    predictions = predict_images(network, meta, image_files(images), chosen, topk, target, batch_size)
    write_predictions(predictions, out)
    skipped = sum(p.skipped is not None for p in predictions)
    if skipped == len(predictions):
        typer.secho(f"error: none of the {skipped} images could be read (reasons in the output)", fg="red", err=True)
        raise typer.Exit(1)
    if skipped:
        log.warning("skipped %d of %d images (listed in the output with the reason)", skipped, len(predictions))


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
