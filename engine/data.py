"""Where training data comes from: the shard folder a run names, or the embedded digit grid."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.config import ConfigError, DataConfig, EvalPrecision, RunConfig
from pipelines import build_loader, describe_backend
from pipelines.contract import AugmentConfig, Loader, LoaderConfig
from shards.manifest import ShardError, SplitManifest, load_split

if TYPE_CHECKING:
    from engine.plan import RunPlan

DIGITS_CACHE_ENV = "MILE_CACHE"
log = logging.getLogger(__name__)


def default_digits_root() -> Path:
    """The embedded digit grid's shard folder: $MILE_CACHE/digits-grid, else ~/.cache/mile-trainer/."""
    cache = os.environ.get(DIGITS_CACHE_ENV) or Path.home() / ".cache" / "mile-trainer"
    return Path(cache) / "digits-grid"


def resolve_data_root(data: DataConfig) -> Path:
    if not data.root:
        from shards.sources.digits_grid import ensure_grid_shards

        return ensure_grid_shards(default_digits_root())
    root = Path(data.root)
    if not root.is_dir():
        raise ShardError(f"--data {root} {'is not a folder' if root.exists() else 'does not exist'}")
    return root


class PlanError(ConfigError, ShardError):
    """A run its data cannot support (a split that is missing, unlabelled where labels are needed,
    smaller than a batch, of other classes). Both a ``ConfigError`` and a ``ShardError``, the two
    kinds the checks raised before they met here, so every caller reports it as it did."""


@dataclass(frozen=True)
class SplitSource:
    """A split a run trains on: its shard folder and its manifest."""

    root: Path
    manifest: SplitManifest


def train_source(config: RunConfig) -> SplitSource:
    """The train split of ``config`` (the embedded digit grid is made on first use): the part of the
    plan that reading a finished run's model needs (its classes, its label kind)."""
    try:
        root = resolve_data_root(config.data)
    except ShardError as error:
        raise PlanError(str(error)) from None
    return SplitSource(root, load_manifest(root, config.data.train_split))


def load_manifest(root: Path, split: str) -> SplitManifest:
    try:
        return load_split(root, split)
    except ShardError as error:
        raise PlanError(str(error)) from None


def resolve_unlabelled_root(data: DataConfig, train_root: Path) -> Path | None:
    """The shard folder of ``unlabelled_split`` (None when the run has none): the train split's
    folder unless ``unlabelled_root`` names another."""
    if not data.unlabelled_split:
        return None
    if not data.unlabelled_root:
        return train_root
    root = Path(data.unlabelled_root)
    if not root.is_dir():
        raise ShardError(f"--unlabelled-data {root} {'is not a folder' if root.exists() else 'does not exist'}")
    return root


def compute_dtype(config: RunConfig, device: torch.device, train: bool) -> torch.dtype | None:
    """The autocast dtype of training or evaluation steps (None = full precision): bf16 on CUDA
    with ``bf16``; evaluation with ``eval_precision = fp32`` turns it off."""
    if device.type != "cuda" or not config.bf16:
        return None
    if not train and config.eval_precision is EvalPrecision.FP32:
        return None
    return torch.bfloat16


def loader_config(config: RunConfig, train: bool, rank: int, world_size: int, device: torch.device) -> LoaderConfig:
    data = config.data
    per_rank_batch = config.global_batch_size // world_size
    augment = AugmentConfig(random_resized_crop=data.augment, flip=data.augment, scale_min=data.crop_scale_min)
    # bf16 runs take bf16 images: half the host-to-device bytes, and autocast would cast anyway
    dtype = compute_dtype(config, device, train) or torch.float32
    return LoaderConfig(
        batch_size=per_rank_batch,
        image_size_px=data.image_size_px,
        train=train,
        augment=augment,
        eval_crop_fraction=data.resolved_eval_crop_fraction,
        backend=data.backend.value,
        verify_checksums=data.verify_data,  # each loader checks its own split's sha256 at start
        num_workers=data.num_workers,
        seed=config.seed,
        rank=rank,
        world_size=world_size,
        device=str(device),
        dtype=dtype,
    )


@dataclass
class RunLoaders:
    """The loaders of a planned run on this rank, each built once: their workers and indices stay for
    the whole run."""

    train: Loader
    evaluation: list[Loader]  # one per eval set, in the plan's order
    unlabelled: Loader | None

    def close(self) -> None:
        for loader in (self.train, *self.evaluation, *([self.unlabelled] if self.unlabelled else [])):
            loader.close()


def build_loaders(plan: RunPlan) -> RunLoaders:
    """Every loader of ``plan`` on this rank, from the plan's loader settings and manifests."""
    how = "auto: CPU affinity / local ranks" if plan.config.data.num_workers < 0 else "--workers"
    log.info("loader: %s", describe_backend(plan.config.data.backend.value))
    log.info("loader workers per process: %d (%s)", plan.train_loader.resolved_workers, how)
    train = build_loader(plan.train.root, plan.config.data.train_split, plan.train_loader, plan.train.manifest)
    evaluation = [build_loader(s.root, s.split, plan.eval_loader, s.manifest) for s in plan.eval_sets]
    source = plan.unlabelled
    unlabelled = (
        None
        if source is None
        else build_loader(source.root, plan.config.data.unlabelled_split, plan.train_loader, source.manifest)
    )
    return RunLoaders(train, evaluation, unlabelled)
