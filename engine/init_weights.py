"""Starting a model's backbone from existing weights (``init_checkpoint``, ``--init-checkpoint``).

Accepted files: a state dict saved with ``torch.save`` (read with ``weights_only=True``, so loading
runs no code), one wrapped in a dict under ``state_dict`` or ``model`` (MoCo, Lightning, DeiT), this
trainer's own checkpoints (their ``components.learner``), and ``.safetensors`` files.

Self-supervised releases prefix their keys; the prefix that matches the most backbone keys wins:
MoCo v2 ``module.encoder_q.`` (its key encoder ``encoder_k``, queue and ``fc`` MLP are skipped),
SimCLR converted ResNets ``module.`` / ``encoder.``, BYOL and SwAV torchvision-style ``module.`` /
``backbone.``. The classifier is never loaded: it keeps the fresh initialisation ``build_model`` gave
it (sigmoid heads: bias -log C), since a new task has new classes. A file that leaves more than half
of the backbone's tensors unloaded, or holds any backbone tensor in another shape (another
architecture, a wrong file), is an error naming them; a few missing tensors are a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.checkpoint import CheckpointError, read_checkpoint
from engine.models import classifier_prefix

log = logging.getLogger(__name__)

# Tried in this order; ties go to the earlier one ("" first: a plain state dict of the same model).
KEY_PREFIXES = (
    "", "module.encoder_q.", "encoder_q.", "module.encoder.", "encoder.", "module.backbone.", "backbone.",
    "module.model.", "model.", "module.",
)  # fmt: skip
WRAPPER_KEYS = ("state_dict", "model")  # dicts that hold the state dict one level down
MAX_UNLOADED_FRACTION = 0.5  # more backbone tensors than this left unloaded: the wrong file, an error
SHOWN_KEYS = 5  # keys named in messages


@dataclass
class LoadReport:
    """What became of a file's tensors when loaded into a model's backbone."""

    prefix: str
    loaded: dict[str, torch.Tensor] = field(default_factory=dict)  # model key -> tensor
    head: list[str] = field(default_factory=list)  # the file's classifier (or projection) keys, skipped
    unexpected: list[str] = field(default_factory=list)  # file keys the backbone has no place for
    mismatched: list[str] = field(default_factory=list)  # "key: file shape vs model shape"
    missing: list[str] = field(default_factory=list)  # backbone keys the file does not fill

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)} backbone tensors (key prefix {self.prefix!r}), skipped {len(self.head)} head "
            f"and {len(self.unexpected)} unexpected, {len(self.mismatched)} of another shape, {len(self.missing)} "
            "missing"
        )


def _error(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"init_checkpoint (--init-checkpoint) {path}: {problem}")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, by key, on the CPU; see the module docstring for the formats."""
    path = Path(path)
    if not path.is_file():
        raise _error(path, "no such file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling and zip errors come in many types; all mean the same here
        raise _error(path, _load_problem(error)) from None
    if isinstance(payload, dict) and "format" in payload and "components" in payload:  # this trainer's checkpoint
        payload = read_checkpoint(path)["components"].get("learner")
    while isinstance(payload, dict) and any(isinstance(payload.get(key), dict) for key in WRAPPER_KEYS):
        payload = next(payload[key] for key in WRAPPER_KEYS if isinstance(payload.get(key), dict))
    tensors = {k: v for k, v in payload.items() if isinstance(v, torch.Tensor)} if isinstance(payload, dict) else {}
    if not tensors:
        raise _error(path, "holds no state dict (no tensors at the top level or under 'state_dict' / 'model')")
    return tensors


def _load_problem(error: Exception) -> str:
    """One line for what ``torch.load(weights_only=True)`` raised. Torch's own message spans lines of
    advice to turn the safe loader off; this project never does (unpickling arbitrary objects runs the
    file's code), so that advice is not passed on."""
    if "Unsupported global" in str(error):  # the pickle names a class or function: objects, not tensors
        return (
            "holds Python objects besides tensors, which are never unpickled here (they can run code); "
            "save a state dict instead: torch.save(model.state_dict(), PATH)"
        )
    return f"cannot be read with torch.load(weights_only=True) ({type(error).__name__}): not a PyTorch weights file"


def check_finite(weights: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights holding NaN or infinity: they would surface steps later as a non-finite loss."""
    for key, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _error(
                path,
                f"tensor {key!r} holds non-finite values (NaN or infinity): the weights file is damaged or "
                f"comes from a run that diverged",
            )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise _error(
            path, "reading .safetensors files needs the safetensors package (pip install safetensors)"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise _error(path, f"not a readable .safetensors file ({error})") from None


def match_keys(weights: dict[str, torch.Tensor], model: nn.Module) -> LoadReport:
    """Which of ``weights`` go where in ``model``'s backbone, under the best-matching key prefix."""
    state = model.state_dict()
    head = classifier_prefix(model)
    backbone = {key: tensor for key, tensor in state.items() if not key.startswith(head)}

    def matches(prefix: str) -> int:
        return sum(1 for key in weights if key.startswith(prefix) and key[len(prefix) :] in backbone)

    report = LoadReport(prefix=max(KEY_PREFIXES, key=matches))  # max keeps the first of equals
    for key, tensor in weights.items():
        name = key[len(report.prefix) :] if key.startswith(report.prefix) else None
        if name is not None and name.startswith(head):
            report.head.append(key)
        elif name is None or name not in backbone:
            report.unexpected.append(key)
        elif tensor.shape != backbone[name].shape:
            report.mismatched.append(f"{name}: file {tuple(tensor.shape)} vs model {tuple(backbone[name].shape)}")
        else:
            report.loaded[name] = tensor
    report.missing = [key for key in backbone if key not in report.loaded]
    return report


def _first(keys: list[str]) -> str:
    more = f", ... ({len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def load_backbone(model: nn.Module, path: Path) -> LoadReport:
    """Load ``path``'s weights into ``model``'s backbone (in place: parameters keep their device,
    dtype and memory format); the classifier is left as it is. Logs what was loaded and skipped."""
    path = Path(path)
    weights = read_weights(path)
    report = match_keys(weights, model)
    num_backbone = len(report.loaded) + len(report.missing)
    # Tensors of another shape mean another architecture (resnet50's keys overlap resnet18's): loading
    # the rest would give a mixed model, so they are an error however few, as is a mostly missing backbone.
    if report.mismatched or len(report.missing) > MAX_UNLOADED_FRACTION * num_backbone:
        shapes = f"; of another shape: {_first(report.mismatched)}" if report.mismatched else ""
        raise _error(
            path,
            f"leaves {len(report.missing)} of the {num_backbone} backbone tensors of {type(model).__name__} unloaded "
            f"(missing: {_first(report.missing)}{shapes}); the file's keys begin {_first(list(weights))}. "
            f"Is it a checkpoint of another architecture than --arch?",
        )
    check_finite(report.loaded, path)
    model.load_state_dict(report.loaded, strict=False)
    log.info("init_checkpoint %s: %s; the classifier is freshly initialised", path, report.summary())
    if report.missing:
        log.warning(
            "init_checkpoint %s: backbone tensors left at their initialisation: %s", path, _first(report.missing)
        )
    return report
