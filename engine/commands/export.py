"""``mile-export RUN --out DIR``: a trained run as a self-contained model folder, and the one reader of it.

An exported model folder holds (``EXPORT_FORMAT`` 1)::

    model.safetensors   the learner's state dict (model.pt, a torch.save state dict, where the
                        safetensors package is missing); loading either runs no code
    model.json          everything predicting and evaluating need (``ExportedModel``): arch, classes
                        and their names, preprocessing (mean, std, image size, eval crop fraction),
                        method, default threshold, eval precision and the run's summary metrics; and,
                        for a reader outside this project, ``architecture`` (whose network: torchvision,
                        timm or this project, with versions) and ``preprocessing`` (every step from
                        file to input tensor: decode, resize rule and interpolation, crop, value range,
                        channel order, mean/std) and ``outputs`` (how logits become label sets)
    model.onnx          with ``--onnx``: the network as an ONNX graph (input ``images``: the
                        preprocessed float32 N×3×S×S batch; output ``logits``: N×classes)

``mile-predict`` and ``mile-eval`` read it through ``load_exported``; they need neither the run folder
nor its config. Every field read back is checked as a flag would be (``check_meta``): a bad one is a
one-line error naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import typer
from torch import nn

from engine.checkpoint import read_checkpoint, recorded_config_changes
from engine.config import EvalPrecision, Method, MethodKind, RunConfig
from engine.data import loader_config, train_source
from engine.models import TORCHVISION_ARCHS, build_model, classifier_prefix
from engine.options import OUT
from engine.run_folder import ClassRecord, RunFolder, checkpoint_classes, saved_config
from pipelines.contract import LoaderConfig
from shards.atomic_files import atomic_write_bytes, atomic_write_text
from shards.command_options import command_app
from shards.format import LabelKind

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1
META_NAME = "model.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "model.pt"
ONNX_NAME = "model.onnx"
ONNX_OPSET = 17
MAX_IMAGE_SIZE_PX = 4096  # model.json's image_size_px above this is refused (a typo, not a model)


class ExportError(ValueError):
    """A run that cannot be exported, or a folder that is not an exported model; names the path. A ValueError: every
    command reports it as one line, also where this module runs as ``__main__`` (another class object)."""


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

    def eval_loader_config(self, **how: Any) -> LoaderConfig:
        """The evaluation preprocessing this card records (size, centre crop, mean/std) as loader
        settings; ``how`` says how to run it (batch size, backend, workers, device, dtype). The one
        place mile-eval and mile-predict turn a card into preprocessing."""
        mean = (self.mean[0], self.mean[1], self.mean[2])  # three values: checked when read
        std = (self.std[0], self.std[1], self.std[2])
        return LoaderConfig(
            image_size_px=self.image_size_px,
            train=False,
            eval_crop_fraction=self.eval_crop_fraction,
            mean=mean,
            std=std,
            **how,
        )

    @property
    def method_kind(self) -> MethodKind:
        """How prediction sets are formed: "softmax" ({argmax}) or "sigmoid" (argmax ∪ over theta)."""
        return Method(self.method).kind

    def to_json(self) -> dict[str, Any]:
        """The fields, then the descriptions for readers outside this project (derived from the
        fields; ``from_json`` reads the fields only)."""
        return {
            **dataclasses.asdict(self),
            "architecture": architecture_source(self.arch),
            "preprocessing": preprocessing_steps(self),
            "outputs": output_rule(self),
        }

    @classmethod
    def from_json(cls, data: Any, source: Path) -> ExportedModel:
        if not isinstance(data, dict):
            raise ExportError(f"{source}: expected a JSON object, found {type(data).__name__}")
        if data.get("format") != EXPORT_FORMAT:
            raise ExportError(
                f"{source}: export format {data.get('format')!r}; this release reads format {EXPORT_FORMAT}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data) - {"format"})
        if missing:
            raise ExportError(f"{source}: missing fields {missing}")
        check_meta(data, source)
        return cls(**{k: v for k, v in data.items() if k in names})


# -- what model.json says to a reader outside this project ----------------------------------


def project_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mile-trainer")
    except PackageNotFoundError:
        return "unknown (not installed)"


def architecture_source(arch: str) -> dict[str, Any]:
    """Whose network ``arch`` is and how to build it (weights come from model.safetensors, never a download)."""
    if arch in TORCHVISION_ARCHS:
        import torchvision

        return {
            "name": arch,
            "source": "torchvision",
            "version": torchvision.__version__,
            "build": f"torchvision.models.{arch}(weights=None, num_classes=NUM_CLASSES)",
        }
    if arch == "grid_cnn":
        from engine.models import GridCNN

        return {
            "name": arch,
            "source": "this project (mile-trainer), not a published architecture",
            "version": project_version(),
            "defined_in": "engine/models.py, class GridCNN",
            "build": "engine.models.build_model('grid_cnn', NUM_CLASSES, multi_label_head)",
            # torch's own description of every layer, for re-implementing it elsewhere
            "layers": repr(GridCNN(num_classes=1)).replace("out_features=1,", "out_features=NUM_CLASSES,").splitlines(),
        }
    import timm

    return {
        "name": arch,
        "source": "timm",
        "version": timm.__version__,
        "build": f"timm.create_model({arch!r}, pretrained=False, num_classes=NUM_CLASSES)",
    }


def eval_resize_px_of(image_size_px: int, eval_crop_fraction: float) -> int:
    from pipelines.contract import LoaderConfig
    from pipelines.transforms import eval_resize_px

    return eval_resize_px(LoaderConfig(image_size_px=image_size_px, train=False, eval_crop_fraction=eval_crop_fraction))


def preprocessing_steps(meta: ExportedModel) -> dict[str, Any]:
    """Every step from an image file to the network's input, in order (``pipelines/transforms.py``,
    evaluation mode; ``mile-predict`` runs exactly these)."""
    size = meta.image_size_px
    return {
        "decode": "the file's pixels as 8-bit RGB (grey and palette images expanded to 3 channels, alpha dropped)",
        "resize": {
            "shorter_side_px": eval_resize_px_of(size, meta.eval_crop_fraction),
            "longer_side": "scaled by the same factor, rounded half up (int(long * shorter_side_px / short + 0.5))",
            "interpolation": "bilinear",
            "antialias": True,
            "as": "torchvision.transforms.v2.functional.resize(image, [h, w], antialias=True)",
        },
        "crop": {
            "kind": "centre",
            "size_px": size,
            "top_px": f"(height - {size} + 1) // 2",
            "left_px": f"(width - {size} + 1) // 2",
        },
        "value_range": "uint8 0..255 divided by 255, giving [0, 1]",
        "normalise": "(x - mean[c]) / std[c] per channel c",
        "mean": list(meta.mean),
        "std": list(meta.std),
        "channel_order": "RGB",
        "layout": f"float32 N x 3 x {size} x {size} (channels first)",
    }


def output_rule(meta: ExportedModel) -> dict[str, str]:
    """How the network's logits become probabilities and the label set (docs/DESIGN.md, "Metrics")."""
    if meta.method_kind == "softmax":
        probabilities, label_set = "softmax(logits) over the classes", "{argmax}"
    elif meta.attributes:
        probabilities, label_set = "sigmoid(logits) per class", "{c : sigmoid(z_c) > theta}"
    else:
        probabilities, label_set = "sigmoid(logits) per class", "{argmax} ∪ {c : sigmoid(z_c) > theta}"
    return {
        "logits": "N x num_classes; column i is class_names[i]",
        "probabilities": probabilities,
        "label_set": label_set + f" (theta: default_theta, {meta.default_theta})",
    }


# -- model.json read back: checked as the flags are ------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _meta_problem(data: dict[str, Any]) -> tuple[str, str] | None:
    """(key, what is wrong) for the first field of ``model.json`` that no run could have written."""
    names = data["class_names"]
    checks: list[tuple[str, bool, str]] = [
        ("arch", isinstance(data["arch"], str) and bool(data["arch"]), "must be a model name"),
        ("num_classes", _is_int(data["num_classes"]) and data["num_classes"] >= 1, "must be an integer >= 1"),
        (
            "class_names",
            isinstance(names, list) and all(isinstance(n, str) for n in names),
            "must be a list of strings",
        ),
    ]
    checks += [
        (
            "class_names",
            len(names) == data["num_classes"],
            f"lists {len(names)} names, num_classes is {data['num_classes']}",
        ),
        ("class_names", len(set(names)) == len(names), "names a class twice"),
        ("method", data["method"] in [m.value for m in Method], f"must be one of {[m.value for m in Method]}"),
        ("attributes", isinstance(data["attributes"], bool), "must be true or false"),
        (
            "image_size_px",
            _is_int(data["image_size_px"]) and 8 <= data["image_size_px"] <= MAX_IMAGE_SIZE_PX,
            f"must be an integer in [8, {MAX_IMAGE_SIZE_PX}]",
        ),
        (
            "eval_crop_fraction",
            _is_number(data["eval_crop_fraction"]) and 0 < data["eval_crop_fraction"] <= 1,
            "must be a number in (0, 1]",
        ),
    ]
    for key, low in (("mean", 0.0), ("std", 0.0)):
        values = data[key]
        shaped = isinstance(values, list) and len(values) == 3 and all(_is_number(v) for v in values)
        checks.append((key, shaped, "must be a list of 3 numbers (R, G, B)"))
        if shaped:
            ok = all(0 <= v <= 1 for v in values) if key == "mean" else all(v > low for v in values)
            checks.append((key, ok, "values must be in [0, 1]" if key == "mean" else "values must be > 0"))
    thetas = data["thetas"]
    checks += [
        ("default_theta", _is_number(data["default_theta"]) and 0 < data["default_theta"] < 1, "must be in (0, 1)"),
        (
            "thetas",
            isinstance(thetas, list) and all(_is_number(t) and 0 < t < 1 for t in thetas),
            "must be numbers in (0, 1)",
        ),
        ("eval_precision", data["eval_precision"] in [p.value for p in EvalPrecision], "must be bf16 or fp32"),
        ("step", _is_int(data["step"]) and data["step"] >= 0, "must be an integer >= 0"),
        ("metrics", data["metrics"] is None or isinstance(data["metrics"], dict), "must be an object or null"),
    ]
    return next(((key, problem) for key, ok, problem in checks if not ok), None)


def check_meta(data: dict[str, Any], source: Path) -> None:
    """``model.json``'s fields, checked as the flags that made them; one line naming the key at fault."""
    if not isinstance(data.get("class_names"), list):
        raise ExportError(f"{source}: key 'class_names' {data.get('class_names')!r} must be a list of strings")
    problem = _meta_problem(data)
    if problem is not None:
        key, what = problem
        raise ExportError(f"{source}: key {key!r} {_short(data[key])} {what}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
    check_config_unedited(config, payload, folder)
    classes = run_classes(folder, payload, config)
    preprocessing = loader_config(config, False, 0, 1, torch.device("cpu"))
    summary = folder.read_summary()
    if summary is None:
        log.warning("%s has no summary.json (the run did not finish): model.json gets no metrics", run_dir)
    meta = ExportedModel(
        arch=config.arch,
        num_classes=len(classes.class_names),
        class_names=list(classes.class_names),
        method=config.method.name.value,
        attributes=classes.label_kind == LabelKind.ATTRIBUTES.value,
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


def run_classes(folder: RunFolder, payload: dict[str, Any], config: RunConfig) -> ClassRecord:
    """The classes the run's weights were trained on: the checkpoint's record (no data needed). A
    checkpoint of a release that wrote none takes them from the train split as it is now, with a
    warning: a re-converted split may name other classes (docs/DESIGN.md, "The run folder")."""
    recorded = checkpoint_classes(payload, folder.checkpoint_path)
    if recorded is not None:
        return recorded
    log.warning(
        "%s holds no class record (written by an older release): class names are read from the train split "
        "%r of %s as it is now; check them against the data the run was trained on",
        folder.checkpoint_path,
        config.data.train_split,
        config.data.root or "the digit grid",
    )
    train = train_source(config).manifest
    return ClassRecord(tuple(train.class_names), train.label_kind.value)


def check_config_unedited(config: RunConfig, payload: dict[str, Any], folder: RunFolder) -> None:
    """The run's ``config.toml`` must describe what its checkpoint trained (it was not edited by hand):
    model.json names arch, method and preprocessing from it beside the checkpoint's weights."""
    unsafe, _ = recorded_config_changes(payload, config, folder.checkpoint_path)
    if unsafe:
        raise ExportError(
            f"{folder.config_path}: {unsafe[0]} since checkpoint {folder.checkpoint_path} was written (edited by "
            f"hand?); restore the value the run trained with"
        )


def write_export(meta: ExportedModel, state: dict[str, torch.Tensor], out_dir: Path, onnx: bool = False) -> Path:
    """Write the weights and ``model.json`` (and with ``onnx`` ``model.onnx``) into ``out_dir``;
    returns the weights file."""
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
    (out_dir / ONNX_NAME).unlink(missing_ok=True)  # a re-export must not leave older weights beside new ones
    description = meta.to_json()
    atomic_write_text(out_dir / META_NAME, json.dumps(description, indent=1, ensure_ascii=False) + "\n")
    if onnx:  # after model.json: a graph the exporter cannot translate leaves a usable folder
        description["onnx"] = write_onnx(meta, tensors, out_dir)
        atomic_write_text(out_dir / META_NAME, json.dumps(description, indent=1, ensure_ascii=False) + "\n")
    return weights


def write_onnx(meta: ExportedModel, state: dict[str, torch.Tensor], out_dir: Path) -> dict[str, Any]:
    """``model.onnx``: the network with these weights as an ONNX graph (fp32; the batch size is free);
    what model.json says about it."""
    model = build_model(meta.arch, meta.num_classes, meta.method_kind is MethodKind.SIGMOID)
    model.load_state_dict(state)
    size = meta.image_size_px
    example = torch.zeros(1, 3, size, size)
    partial = out_dir / f"{ONNX_NAME}.partial"
    try:
        with warnings.catch_warnings():
            # the TorchScript-based exporter: it needs no extra package (the newer one needs onnxscript)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model.eval(),
                (example,),
                str(partial),
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
    except Exception as error:  # an operator the exporter cannot translate; the other files are written
        partial.unlink(missing_ok=True)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ExportError(f"{out_dir / ONNX_NAME}: ONNX export of arch {meta.arch!r} failed ({first_line})") from None
    os.replace(partial, out_dir / ONNX_NAME)
    return {
        "file": ONNX_NAME,
        "opset": ONNX_OPSET,
        "input": f"images: float32 N x 3 x {size} x {size}, after every step of 'preprocessing'",
        "output": f"logits: float32 N x {meta.num_classes}; see 'outputs'",
    }


def export_run(run_dir: Path, out_dir: Path, onnx: bool = False) -> Path:
    meta, state = describe_run(Path(run_dir))
    return write_export(meta, state, Path(out_dir), onnx)


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
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(model_dir / SAFETENSORS_NAME), device="cpu")
        except (SafetensorError, OSError) as error:
            raise ExportError(f"{model_dir / SAFETENSORS_NAME}: not a readable .safetensors file ({error})") from None
    if (model_dir / TORCH_NAME).is_file():
        try:
            state = torch.load(model_dir / TORCH_NAME, map_location="cpu", weights_only=True)
        except Exception as error:  # unpickling and zip errors come in many types; all mean the same here
            raise ExportError(
                f"{model_dir / TORCH_NAME}: not a state dict torch.load(weights_only=True) can read "
                f"({type(error).__name__})"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ExportError(f"{model_dir / TORCH_NAME}: expected a state dict of tensors")
        return state
    raise ExportError(f"{model_dir} holds no weights ({SAFETENSORS_NAME} or {TORCH_NAME})")


def load_exported(model_dir: Path, device: torch.device) -> tuple[ExportedModel, nn.Module]:
    """An exported model's description and its network, with the weights, in eval mode on ``device``."""
    meta = read_meta(model_dir)
    try:
        model = build_model(meta.arch, meta.num_classes, meta.method_kind is MethodKind.SIGMOID)
    except ValueError as error:
        raise ExportError(f"{Path(model_dir) / META_NAME}: key 'arch': {error}") from None
    state = read_weights(model_dir)
    check_output_size(meta, model, state, Path(model_dir))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # keys or shapes that do not fit model.json's arch
        raise ExportError(
            f"{model_dir}: the weights do not fit arch {meta.arch!r} with {meta.num_classes} classes ({error})"
        ) from None
    return meta, model.to(device).eval()


def check_output_size(meta: ExportedModel, model: nn.Module, state: dict[str, torch.Tensor], model_dir: Path) -> None:
    """The weights' classifier must have one output per class of model.json."""
    weight = state.get(classifier_prefix(model) + "weight")
    if weight is not None and weight.shape[0] != meta.num_classes:
        raise ExportError(
            f"{model_dir / META_NAME}: key 'num_classes' {meta.num_classes} does not match the weights' "
            f"classifier, which has {weight.shape[0]} outputs"
        )


def autocast_dtype(meta: ExportedModel, device: torch.device) -> torch.dtype | None:
    """The run's evaluation precision: bf16 autocast on CUDA unless it evaluated in fp32; CPU is fp32."""
    if device.type == "cuda" and meta.eval_precision == EvalPrecision.BF16.value:
        return torch.bfloat16
    return None


# -- command line ----------------------------------------------------------------------------

app = command_app()


@app.command()
def export(
    run: Path = typer.Argument(..., help="A run folder (engine-run --out) with checkpoints/last.pt."),
    out: Path = OUT.option(help="Folder to write model.safetensors and model.json into."),
    onnx: bool = typer.Option(
        False, "--onnx", help="Also write model.onnx (input: the preprocessed N×3×S×S batch; output: logits)."
    ),
) -> None:
    """Export a trained run's model: weights (safetensors) plus model.json for mile-predict and mile-eval."""
    from engine.commands.runner import check_out_folder

    check_out_folder(out)
    weights = export_run(run, out, onnx)
    extra = f", {out / ONNX_NAME}" if onnx else ""
    typer.echo(f"wrote {weights}{extra} and {out / META_NAME}")


def main() -> None:
    from engine.commands.runner import run_cli

    run_cli(app)


if __name__ == "__main__":
    main()
