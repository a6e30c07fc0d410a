"""Where training data comes from: the shard folder a run names, or the embedded digit grid."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ConfigError, DataConfig, EvalPrecision, RunConfig, Switch
from pipelines import build_loader, describe_backend
from pipelines.contract import AugmentConfig, Loader, LoaderConfig
from shards.format import LabelKind
from shards.manifest import ShardError, SplitManifest, load_split, manifest_path

DEFAULT_EXTRA_EVAL_SPLIT = "val"

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


def build_loaders(
    config: RunConfig, root: Path, rank: int, world_size: int, device: torch.device
) -> tuple[Loader, Loader]:
    if config.global_batch_size % world_size:
        raise ValueError(f"--batch-size {config.global_batch_size} is not divisible by {world_size} processes")
    train_config = loader_config(config, True, rank, world_size, device)
    workers = train_config.resolved_workers
    how = "auto: CPU affinity / local ranks" if config.data.num_workers < 0 else "--workers"
    log.info("loader: %s", describe_backend(config.data.backend.value))
    log.info("loader workers per process: %d (%s)", workers, how)
    train = build_loader(root, config.data.train_split, train_config)
    evaluation = build_loader(root, config.data.eval_split, loader_config(config, False, rank, world_size, device))
    return train, evaluation


def build_unlabelled_loader(config: RunConfig, root: Path, rank: int, world_size: int, device: torch.device) -> Loader:
    """The loader of the unlabelled split: training order, batch size and augmentation, like the train split's."""
    return build_loader(root, config.data.unlabelled_split, loader_config(config, True, rank, world_size, device))


# -- eval sets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSet:
    """One split scored at every eval point. The run's own eval split has the empty name and writes
    its metrics under their plain keys (``top1``); every ``--eval-data`` set writes ``NAME/top1``."""

    name: str  # "" for data.eval_split; "FOLDER/SPLIT" for an extra set
    root: Path
    split: str
    manifest: SplitManifest
    score_targets: bool  # multi-label metrics are scored (the split has targets and they are not switched off)

    def key(self, metric: str) -> str:
        return f"{self.name}/{metric}" if self.name else metric


def parse_eval_data(spec: str) -> tuple[Path, str]:
    """``DIR`` or ``DIR:SPLIT`` -> (folder, split); a colon followed by a path is part of the folder."""
    folder, colon, split = spec.rpartition(":")
    if colon and folder and split and "/" not in split and "\\" not in split:
        return Path(folder), split
    return Path(spec), DEFAULT_EXTRA_EVAL_SPLIT


def extra_eval_sets(config: RunConfig, train: SplitManifest, train_root: Path) -> list[EvalSet]:
    """The ``data.extra_eval`` sets, each checked (folder, split, classes) before anything is written;
    names are the folder's name and the split, made unique with -2, -3."""
    sets: list[EvalSet] = []
    for spec in config.data.extra_eval:
        root, split = parse_eval_data(spec)
        if not root.is_dir():
            raise ConfigError(
                f"data.extra_eval (--eval-data) {spec!r}: {root} "
                f"{'is not a folder' if root.exists() else 'does not exist'}"
            )
        try:
            manifest = load_split(root, split)
        except ShardError as error:
            raise ConfigError(f"data.extra_eval (--eval-data) {spec!r}: {error}") from None
        if manifest.label_kind is LabelKind.UNLABELLED:
            raise ConfigError(
                f"data.extra_eval (--eval-data) {spec!r}: split {split!r} is unlabelled: "
                "no ground truth to score against"
            )
        check_same_classes(spec, manifest, root, train, train_root)
        name = _unique_name(f"{root.resolve().name}/{split}", {s.name for s in sets})
        scored = manifest.label_kind.has_targets and config.multilabel_metrics is not Switch.OFF
        sets.append(EvalSet(name, root, split, manifest, scored))
    return sets


def _unique_name(name: str, taken: set[str]) -> str:
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        candidate = f"{name}-{number}"
    return candidate


def check_same_classes(spec: str, manifest: SplitManifest, root: Path, train: SplitManifest, train_root: Path) -> None:
    """An eval set's class index must mean the train split's class: same names, same order."""
    ours, theirs = train.class_names, manifest.class_names
    if ours == theirs:
        return
    index = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    raise ConfigError(
        f"data.extra_eval (--eval-data) {spec!r}: split {manifest.name!r} of {manifest_path(root)} has "
        f"{len(theirs)} classes, split {train.name!r} of {manifest_path(train_root)} (the train split) has "
        f"{len(ours)}; they first differ at class index {index}: {_class_at(theirs, index)} vs "
        f"{_class_at(ours, index)}. Convert the eval set with the train split's class list, in its order: for "
        "ImageNet val with a WebVision model, `make-shards webvision --write-class-list classes.txt ...` then "
        "`make-shards imagenet --class-list classes.txt ...`; an image folder split written with `make-shards "
        "folder --out` into the train split's folder reuses its classes"
    )


def _class_at(names: list[str], index: int) -> str:
    return repr(names[index]) if index < len(names) else "(none)"


def build_eval_loader(config: RunConfig, eval_set: EvalSet, rank: int, world_size: int, device: torch.device) -> Loader:
    return build_loader(eval_set.root, eval_set.split, loader_config(config, False, rank, world_size, device))
