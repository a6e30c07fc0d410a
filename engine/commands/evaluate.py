"""``mile-eval --model DIR --data SHARDS [--split val]``: score an exported model on any converted split.

The split is read by the same loaders and scored by the same ``EvalAccumulator`` as a run's
evaluation, with the preprocessing and thresholds of ``model.json``, so the run's own eval split
reproduces its summary metrics. The metrics are printed as JSON (and written to ``--out``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
import typer

from engine.commands.export import META_NAME, ExportError, autocast_dtype, load_exported
from engine.commands.runner import check_out_file, run_cli
from engine.config import Backend, check_loader_workers
from engine.distributed import resolve_device
from engine.options import BATCH_SIZE, DEVICE, LOADER, MODEL, OUT, THETA, WORKERS
from engine.run_folder import class_difference
from engine.scoring import accumulator_for, score_split
from pipelines import build_loader, describe_backend
from shards.atomic_files import atomic_write_text
from shards.command_options import command_app
from shards.format import LabelKind
from shards.manifest import load_split

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_exported(
    model_dir: Path,
    data: Path,
    split: str,
    device: torch.device,
    thetas: tuple[float, ...] = (),
    batch_size: int = 128,
    backend: str = "auto",
    num_workers: int = -1,
) -> dict[str, Any]:
    """Metrics of the exported model on ``split`` of the shard folder ``data`` (thetas: model.json's by default)."""
    manifest = load_split(data, split)
    if manifest.label_kind is LabelKind.UNLABELLED:
        raise ExportError(f"split {split!r} of {data} is unlabelled: it holds no ground truth to score a model against")
    meta, model = load_exported(model_dir, device)
    difference = class_difference(meta.class_names, manifest.class_names)
    if difference:
        raise ExportError(
            f"split {split!r} of {data} has {manifest.num_classes} classes, the model in {model_dir} "
            f"({META_NAME}) has {meta.num_classes}; {difference}. Its scores would credit other classes: "
            "evaluate on a split converted with the model's class list, in its order"
        )
    thetas = thetas or tuple(meta.thetas)
    accumulator = accumulator_for(manifest, thetas, meta.method_kind, manifest.label_kind.has_targets, device)
    dtype = autocast_dtype(meta, device)
    log.info("loader: %s", describe_backend(backend))
    loader = build_loader(
        data,
        split,
        meta.eval_loader_config(
            batch_size=batch_size,
            backend=backend,
            num_workers=num_workers,
            device=str(device),
            dtype=dtype or torch.float32,
        ),
    )
    try:
        return score_split(model, loader, accumulator, dtype, device)  # the loop a run's evaluation runs
    finally:
        loader.close()


app = command_app()


@app.command()
def evaluate(
    model: Path = MODEL.option(),
    data: Path = typer.Option(..., "--data", help="A shard folder with manifest.json (make-shards)."),
    split: str = typer.Option("val", "--split", help="Split to score."),
    theta: Optional[list[float]] = THETA.option(default=None, help=f"{THETA.help} Default: the run's."),
    out: Optional[Path] = OUT.option(default=None, help="Also write the metrics JSON here."),
    device: str = DEVICE.option(),
    batch_size: int = BATCH_SIZE.option(),
    loader: Backend = LOADER.option(),
    workers: int = WORKERS.option(),
) -> None:
    """Score an exported model on a converted split with the run's metrics; prints them as JSON."""
    check_loader_workers(workers)
    if out is not None:
        check_out_file(out)
    metrics = evaluate_exported(
        model, data, split, resolve_device(device), tuple(theta or ()), batch_size, loader, workers
    )
    text = json.dumps({"split": split, **metrics}, indent=1) + "\n"
    typer.echo(text, nl=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
