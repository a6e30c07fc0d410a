"""Scoring a model on a split: the one loop a run's evaluation and ``mile-eval`` share, and a trained
run's model re-loaded from its folder with its outputs on an eval split (for metrics that need the
raw scores rather than the summary: the report's F1-vs-coverage curve).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.checkpoint import read_checkpoint
from engine.config import MethodKind, RunConfig
from engine.data import compute_dtype, loader_config, resolve_data_root, train_source
from engine.metrics import EvalAccumulator, PseudoLabelStats
from engine.models import build_model
from engine.run_folder import RunFolder, checkpoint_classes, saved_config
from engine.steps import autocast_context
from pipelines import build_loader
from pipelines.contract import Loader
from shards.format import LabelKind
from shards.manifest import SplitManifest


def accumulator_for(
    manifest: SplitManifest,
    thetas: tuple[float, ...],
    method_kind: MethodKind,
    score_targets: bool,
    device: torch.device,
) -> EvalAccumulator:
    """The accumulator of one pass over the split of ``manifest``: a run's eval point and ``mile-eval``
    score with the same one. ``score_targets``: the split's multi-hot targets are scored."""
    return EvalAccumulator(
        num_classes=manifest.num_classes,
        thetas=thetas,
        method_kind=method_kind,
        has_targets=score_targets,
        attributes=manifest.label_kind is LabelKind.ATTRIBUTES,
        device=device,
    )


@torch.no_grad()
def score_split(
    model: nn.Module,
    loader: Loader,
    accumulator: EvalAccumulator,
    dtype: torch.dtype | None,
    device: torch.device,
    pseudo: PseudoLabelStats | None = None,
) -> dict[str, float]:
    """``accumulator``'s metrics of ``model`` over one pass of ``loader`` (targets scored when the
    accumulator has them), with ``pseudo``'s pseudo-label statistics when given; the model must
    already be in eval mode."""
    for batch in loader.epoch(0):
        with autocast_context(dtype, device.type):
            logits = model(batch.images).float()
        targets = batch.targets if accumulator.has_targets else None
        accumulator.update(logits, batch.labels, targets)
        if pseudo is not None:
            pseudo.update(logits, targets)
    metrics = accumulator.compute()
    if pseudo is not None:
        metrics.update(pseudo.compute(has_targets=accumulator.has_targets and not accumulator.attributes))
    return metrics


@dataclass
class EvalOutputs:
    """Logits, single labels and multi-hot targets of every image of one split, on the CPU."""

    logits: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor | None


def load_learner(run_dir: Path, device: torch.device) -> tuple[RunConfig, nn.Module]:
    """The run's config and its learner with the weights of the last checkpoint, in eval mode. The
    number of outputs comes from the checkpoint's class record (the train split is read only for a
    checkpoint written before records existed)."""
    config = saved_config(run_dir)
    path = RunFolder(run_dir).checkpoint_path
    payload = read_checkpoint(path, device)
    recorded = checkpoint_classes(payload, path)
    num_classes = len(recorded.class_names) if recorded is not None else train_source(config).manifest.num_classes
    model = build_model(config.arch, num_classes, config.method.multi_label_head)
    model.load_state_dict(payload["components"]["learner"])
    return config, model.to(device).eval()


@torch.no_grad()
def eval_outputs(run_dir: Path, device: torch.device = torch.device("cpu"), split: str | None = None) -> EvalOutputs:
    """Run the trained learner over ``split`` (default: the run's eval split) as evaluation does."""
    config, model = load_learner(run_dir, device)
    root = resolve_data_root(config.data)
    loader = build_loader(root, split or config.data.eval_split, loader_config(config, False, 0, 1, device))
    logits, labels, targets = [], [], []
    try:
        for batch in loader.epoch(0):
            with autocast_context(compute_dtype(config, device, train=False), device.type):
                logits.append(model(batch.images).float().cpu())
            labels.append(batch.labels.cpu())
            if batch.targets is not None:
                targets.append(batch.targets.cpu())
    finally:
        loader.close()
    return EvalOutputs(torch.cat(logits), torch.cat(labels), torch.cat(targets) if targets else None)
