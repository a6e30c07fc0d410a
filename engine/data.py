"""Where training data comes from: the shard folder a run names, or the embedded digit grid."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from engine.config import DataConfig, EvalPrecision, RunConfig
from pipelines import build_loader
from pipelines.contract import AugmentConfig, Loader, LoaderConfig
from shards.manifest import ShardError

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


def build_loaders(config: RunConfig, root: Path, rank: int, world_size: int, device: torch.device) -> tuple[Loader, Loader]:
    if config.global_batch_size % world_size:
        raise ValueError(f"--batch-size {config.global_batch_size} is not divisible by {world_size} processes")
    train_config = loader_config(config, True, rank, world_size, device)
    workers = train_config.resolved_workers
    how = "auto: CPU affinity / local ranks" if config.data.num_workers < 0 else "--workers"
    log.info("loader workers per process: %d (%s)", workers, how)
    train = build_loader(root, config.data.train_split, train_config)
    evaluation = build_loader(root, config.data.eval_split, loader_config(config, False, rank, world_size, device))
    return train, evaluation
