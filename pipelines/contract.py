"""The pipeline output contract and configuration shared by every backend (DALI GPU/CPU, torch).

Every loader yields ``Batch`` objects: images N×C×H×W in ``torch.channels_last`` memory format on
the engine's device, normalised, in the engine's dtype; ``labels`` int64 N; ``targets`` float32
multi-hot N×num_classes where the split has multi-labels (else None). Training batches have a
fixed N (the last partial batch of an epoch is dropped) so captured CUDA graphs can be replayed;
evaluation batches cover every sample of the rank's share exactly once (the last may be smaller).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from shards.manifest import ShardError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKENDS = ("auto", "dali", "torch")
AUTO_WORKERS = -1  # ``num_workers``: one per CPU core this process may run on, shared by the local ranks
LOCAL_RANKS_ENV = "LOCAL_WORLD_SIZE"  # torchrun's count of processes on this machine


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation. ``random_resized_crop=False`` and ``flip=False`` give a plain resize
    (the digit grid trains that way: a crop can remove a digit and a flip mirrors one)."""

    random_resized_crop: bool = True
    scale_min: float = 0.08
    scale_max: float = 1.0
    ratio_min: float = 3 / 4
    ratio_max: float = 4 / 3
    flip: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.scale_min <= self.scale_max <= 1.0:
            raise ValueError(
                f"crop scale range must satisfy 0 < min <= max <= 1, got ({self.scale_min}, {self.scale_max})"
            )
        if not 0.0 < self.ratio_min <= self.ratio_max:
            raise ValueError(f"crop ratio range must satisfy 0 < min <= max, got ({self.ratio_min}, {self.ratio_max})")


@dataclass(frozen=True)
class LoaderConfig:
    """What a loader produces and where; one config for every backend."""

    batch_size: int = 256  # per rank
    image_size_px: int = 224
    train: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval_crop_fraction: float = 0.875  # eval: resize shorter side to size/fraction, centre-crop size
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    backend: str = "auto"  # auto = DALI when installed, else torch
    num_workers: int = AUTO_WORKERS  # decoding threads (DALI) or processes (torch, 0 = in-process); -1 = auto
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"  # "cpu" or "cuda[:i]"
    dtype: torch.dtype = torch.float32
    shuffle_buffer: int = 4096  # DALI's initial_fill; the torch backend shuffles the whole epoch
    # At start every loader checks shard sizes and index files (cheap); this also re-hashes every
    # shard against the manifest's sha256 (reads the whole split once: the engine's --verify-data).
    verify_checksums: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.image_size_px < 8:
            raise ValueError(f"image_size_px must be >= 8, got {self.image_size_px}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if not 0.0 < self.eval_crop_fraction <= 1.0:
            raise ValueError(f"eval_crop_fraction must be in (0, 1], got {self.eval_crop_fraction}")
        if self.num_workers < AUTO_WORKERS:
            raise ValueError(f"num_workers must be >= 0, or {AUTO_WORKERS} for auto, got {self.num_workers}")

    @property
    def resolved_workers(self) -> int:
        """``num_workers``, with auto resolved by ``auto_workers``."""
        return auto_workers() if self.num_workers == AUTO_WORKERS else self.num_workers


def auto_workers() -> int:
    """Loader threads/processes per rank when the user leaves the count on auto, as NVIDIA's DALI
    ResNet-50 recipe sizes them: the CPU cores this process may run on (its affinity, which
    containers and ``taskset`` narrow, not the machine's count) split between the ranks on this
    machine (``LOCAL_WORLD_SIZE``, set by torchrun; 1 without it), at least 1."""
    cores = len(os.sched_getaffinity(0))
    raw = os.environ.get(LOCAL_RANKS_ENV, "1").strip() or "1"
    try:
        local_ranks = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {LOCAL_RANKS_ENV}={raw!r} is not a whole number") from None
    return max(1, cores // max(1, local_ranks))


class ShardDataError(ShardError):
    """A sample that could not be read or decoded in the middle of an epoch: the shard is damaged
    although its size and index passed the start-up checks. The message names the shard file, the
    sample (or, where the backend cannot tell which, the split and the shards it was reading) and
    says to run ``make-shards verify``."""


def verify_advice(root: object) -> str:
    """What to do about a damaged shard folder, for error messages."""
    return f"the shard folder is damaged: run `make-shards verify {root}` to list every problem, then re-convert"


@dataclass
class Batch:
    """One device batch (see the module docstring for the contract)."""

    images: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]


class Loader(Protocol):
    """What every backend provides."""

    num_classes: int
    num_samples: int  # this rank's samples per epoch
    batches_per_epoch: int  # this rank's batches per epoch (train: full batches only)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of epoch ``epoch`` (shuffle fixed by seed and epoch), from batch ``start_batch``."""
        ...

    def close(self) -> None: ...


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous share of sample positions, the split DALI's reader uses
    (``shard_id``/``num_shards``): [floor(N*r/W), floor(N*(r+1)/W))."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def train_batch_range(batch_index: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Positions in the epoch's global permutation that rank ``rank`` trains on in batch ``batch_index``
    of the epoch (the torch backend's rule): the global batch of ``G = batch_size * world_size`` samples
    is [s*G, (s+1)*G) and rank r takes its contiguous slice [s*G + r*B, s*G + (r+1)*B). Every step
    therefore trains on the same samples whatever the number of processes, and a data position (epoch,
    batch index) means the same samples after a restart on another number of processes."""
    start = batch_index * batch_size * world_size + rank * batch_size
    return start, start + batch_size


def batches_per_epoch(num_samples: int, config: LoaderConfig) -> int:
    """Batches per epoch on ``config.rank``, the same rule for every backend. Training: full global
    batches, the same count on every rank (DDP would hang otherwise); N // (B*W) equals the full
    per-rank batches of the smallest rank share, (N // W) // B. Evaluation: this rank's whole
    share, the last batch possibly partial."""
    if config.train:
        return num_samples // (config.batch_size * config.world_size)
    start, stop = rank_range(num_samples, config.rank, config.world_size)
    return -(-(stop - start) // config.batch_size)
