"""``mile-export RUN --out DIR``: a trained run as a self-contained model folder, and the one reader of it.

An exported model folder holds (``EXPORT_FORMAT`` 1)::

    model.safetensors   the learner's state dict (model.pt, a torch.save state dict, where the
                        safetensors package is missing); loading either runs no code
    model.json          everything predicting and evaluating need (``ExportedModel``): arch, classes
                        and their names, preprocessing (mean, std, image size, eval crop fraction),
                        method, default threshold, eval precision and the run's summary metrics

``mile-predict`` and ``mile-eval`` read it through ``load_exported``; they need neither the run folder
nor its config.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import typer
from torch import nn

from engine.checkpoint import read_checkpoint
from engine.config import EvalPrecision, Method, MethodKind
from engine.data import loader_config, train_source
from engine.models import build_model
from engine.run_folder import RunFolder, saved_config
from shards.atomic_files import atomic_write_bytes, atomic_write_text
from shards.format import LabelKind

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1
META_NAME = "model.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "model.pt"


class ExportError(Exception):
    """A run that cannot be exported, or a folder that is not an exported model; names the path."""


@dataclass(frozen=True)
class ExportedModel:
    """The contents of ``model.json``."""

    arch: str
    num_classes: int
    class_names: list[str]
    method: str  # softmax | sigmoid | mile
    attributes: bool  # trained on independent binary attributes (no forced argmax in prediction sets)
    image_size_px: int
    eval_crop_fraction: float  # resize the shorter side to size / fraction, centre-crop size
    mean: list[float]
    std: list[float]
    default_theta: float  # the run's first eval threshold
    thetas: list[float]  # all of the run's eval thresholds
    eval_precision: str  # bf16 | fp32: how the run evaluated on CUDA
    step: int  # optimizer steps behind these weights
    metrics: dict[str, Any] | None  # the run's summary metrics; None for an unfinished run
    format: int = EXPORT_FORMAT

    @property
    def method_kind(self) -> MethodKind:
        """How prediction sets are formed: "softmax" ({argmax}) or "sigmoid" (argmax ∪ over theta)."""
        return Method(self.method).kind

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path) -> ExportedModel:
        if data.get("format") != EXPORT_FORMAT:
            raise ExportError(
                f"{source}: export format {data.get('format')!r}; this release reads format {EXPORT_FORMAT}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data) - {"format"})
        if missing:
            raise ExportError(f"{source}: missing fields {missing}")
        return cls(**{k: v for k, v in data.items() if k in names})


def safetensors_available() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


# -- writing ---------------------------------------------------------------------------------


def describe_run(run_dir: Path) -> tuple[ExportedModel, dict[str, torch.Tensor]]:
    """``model.json``'s contents and the learner's weights of the run in ``run_dir`` (its last checkpoint)."""
    config = saved_config(run_dir)
    folder = RunFolder(run_dir)
    payload = read_checkpoint(folder.checkpoint_path)
    train = train_source(config).manifest
    preprocessing = loader_config(config, False, 0, 1, torch.device("cpu"))
    summary = folder.read_summary()
    if summary is None:
        log.warning("%s has no summary.json (the run did not finish): model.json gets no metrics", run_dir)
    meta = ExportedModel(
        arch=config.arch,
        num_classes=train.num_classes,
        class_names=list(train.class_names),
        method=config.method.name.value,
        attributes=train.label_kind is LabelKind.ATTRIBUTES,
        image_size_px=preprocessing.image_size_px,
        eval_crop_fraction=preprocessing.eval_crop_fraction,
        mean=list(preprocessing.mean),
        std=list(preprocessing.std),
        default_theta=config.eval_thetas[0],
        thetas=list(config.eval_thetas),
        eval_precision=config.eval_precision.value,
        step=int(payload["components"]["progress"]["step"]),
        metrics=None if summary is None else {k: v for k, v in summary.items() if k not in ("step", "method")},
    )
    return meta, payload["components"]["learner"]


def write_export(meta: ExportedModel, state: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """Write the weights and ``model.json`` into ``out_dir``; returns the weights file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # contiguous copies: safetensors stores dense row-major tensors (channels-last weights are not)
    # and refuses tensors that share memory
    tensors = {key: value.detach().cpu().clone(memory_format=torch.contiguous_format) for key, value in state.items()}
    if safetensors_available():
        from safetensors.torch import save

        weights = out_dir / SAFETENSORS_NAME
        atomic_write_bytes(weights, save(tensors, metadata={"format": "pt"}))
    else:
        log.warning("safetensors is not installed: writing %s as a torch state dict instead", TORCH_NAME)
        weights = out_dir / TORCH_NAME
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        atomic_write_bytes(weights, buffer.getvalue())
    for stale in {out_dir / SAFETENSORS_NAME, out_dir / TORCH_NAME} - {weights}:
        stale.unlink(missing_ok=True)  # a re-export must not leave the other format's older weights
    atomic_write_text(out_dir / META_NAME, json.dumps(meta.to_json(), indent=1) + "\n")
    return weights


def export_run(run_dir: Path, out_dir: Path) -> Path:
    meta, state = describe_run(Path(run_dir))
    return write_export(meta, state, Path(out_dir))


# -- reading ---------------------------------------------------------------------------------


def read_meta(model_dir: Path) -> ExportedModel:
    path = Path(model_dir) / META_NAME
    if not path.is_file():
        raise ExportError(
            f"{model_dir} is not an exported model folder (no {META_NAME}); make one with mile-export RUN --out DIR"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path} is not valid JSON ({error})") from None
    return ExportedModel.from_json(data, path)


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    model_dir = Path(model_dir)
    if (model_dir / SAFETENSORS_NAME).is_file():
        if not safetensors_available():
            raise ExportError(
                f"{model_dir / SAFETENSORS_NAME}: reading it needs the safetensors package (pip install safetensors)"
            )
        from safetensors.torch import load_file

        return load_file(str(model_dir / SAFETENSORS_NAME), device="cpu")
    if (model_dir / TORCH_NAME).is_file():
        return torch.load(model_dir / TORCH_NAME, map_location="cpu", weights_only=True)
    raise ExportError(f"{model_dir} holds no weights ({SAFETENSORS_NAME} or {TORCH_NAME})")


def load_exported(model_dir: Path, device: torch.device) -> tuple[ExportedModel, nn.Module]:
    """An exported model's description and its network, with the weights, in eval mode on ``device``."""
    meta = read_meta(model_dir)
    model = build_model(meta.arch, meta.num_classes, meta.method_kind is MethodKind.SIGMOID)
    try:
        model.load_state_dict(read_weights(model_dir))
    except RuntimeError as error:  # keys or shapes that do not fit model.json's arch
        raise ExportError(
            f"{model_dir}: the weights do not fit arch {meta.arch!r} with {meta.num_classes} classes ({error})"
        ) from None
    return meta, model.to(device).eval()


def autocast_dtype(meta: ExportedModel, device: torch.device) -> torch.dtype | None:
    """The run's evaluation precision: bf16 autocast on CUDA unless it evaluated in fp32; CPU is fp32."""
    if device.type == "cuda" and meta.eval_precision == EvalPrecision.BF16.value:
        return torch.bfloat16
    return None


# -- command line ----------------------------------------------------------------------------

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def export(
    run: Path = typer.Argument(..., help="A run folder (engine-run --out) with checkpoints/last.pt."),
    out: Path = typer.Option(..., "--out", help="Folder to write model.safetensors and model.json into."),
) -> None:
    """Export a trained run's model: weights (safetensors) plus model.json for mile-predict and mile-eval."""
    weights = export_run(run, out)
    typer.echo(f"wrote {weights} and {out / META_NAME}")


def main() -> None:
    from engine.commands.runner import run_cli

    run_cli(app)


if __name__ == "__main__":
    main()
