"""Run configuration: one small frozen dataclass per component, assembled into ``RunConfig``.

Values come from (lowest to highest priority) the dataclass defaults, a TOML file (``--config``)
and command-line flags. ``RunConfig.to_json`` is written into every run folder.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

METHODS = ("softmax", "sigmoid", "mile")
STUDENT_INITS = ("teacher", "previous")
SCHEDULES = ("cosine", "step", "constant")


class ConfigError(ValueError):
    """A bad option; the message names the option."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how batches are made."""

    root: str = ""  # shard folder (manifest.json); empty = the embedded digit grid, built on first use
    train_split: str = "train"
    eval_split: str = "val"
    image_size_px: int = 24
    augment: bool = False  # random-resized-crop + flip (off for the digit grid: crops remove digits)
    crop_scale_min: float = 0.08
    # eval: resize the shorter side to size/fraction, centre-crop size. 0 = auto: 0.875 with train
    # augmentation (the ImageNet convention), 1.0 without it (eval sees what training saw, whole)
    eval_crop_fraction: float = 0.0
    backend: str = "auto"
    num_workers: int = 2

    def __post_init__(self) -> None:
        _require(self.image_size_px >= 8, f"--image-size must be >= 8, got {self.image_size_px}")
        _require(self.backend in ("auto", "dali", "torch"), f"--loader must be auto, dali or torch, got {self.backend!r}")
        _require(self.num_workers >= 0, f"--workers must be >= 0, got {self.num_workers}")
        _require(0.0 < self.crop_scale_min <= 1.0, f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        _require(0.0 <= self.eval_crop_fraction <= 1.0, f"--eval-crop must be in [0, 1], got {self.eval_crop_fraction}")

    @property
    def resolved_eval_crop_fraction(self) -> float:
        if self.eval_crop_fraction > 0:
            return self.eval_crop_fraction
        return 0.875 if self.augment else 1.0


@dataclass(frozen=True)
class MethodConfig:
    """Which loss and, for MILe, the phase machine (DESIGN §1)."""

    name: str = "mile"
    k_teacher_steps: int = 100
    k_student_steps: int = 50
    rho: float = 0.25  # pseudo-label threshold: target = 1[sigmoid(teacher(x)) > rho]
    student_init: str = "teacher"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _require(self.name in METHODS, f"--method must be one of {METHODS}, got {self.name!r}")
        _require(self.k_teacher_steps >= 1, f"--k-teacher-steps must be >= 1, got {self.k_teacher_steps}")
        _require(self.k_student_steps >= 1, f"--k-student-steps must be >= 1, got {self.k_student_steps}")
        _require(0.0 < self.rho < 1.0, f"--rho must be in (0, 1), got {self.rho}")
        _require(self.student_init in STUDENT_INITS, f"--student-init must be one of {STUDENT_INITS}, got {self.student_init!r}")
        _require(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")

    @property
    def multi_label_head(self) -> bool:
        return self.name != "softmax"


@dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum, learning rate per 256 images, warmup then decay; all per step."""

    lr_per_256: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_lr_steps: int = 0
    step_decay_every: int = 0  # "step" schedule: multiply by step_decay_factor every N steps
    step_decay_factor: float = 0.1

    def __post_init__(self) -> None:
        _require(self.lr_per_256 > 0, f"--lr must be > 0, got {self.lr_per_256}")
        _require(0.0 <= self.momentum < 1.0, f"--momentum must be in [0, 1), got {self.momentum}")
        _require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        _require(self.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _require(self.warmup_lr_steps >= 0, f"--warmup-lr-steps must be >= 0, got {self.warmup_lr_steps}")
        _require(not self.nesterov or self.momentum > 0, "--nesterov needs --momentum > 0")
        _require(self.schedule != "step" or self.step_decay_every > 0, "--schedule step needs step_decay_every > 0")


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    arch: str = "grid_cnn"
    num_steps: int = 3000
    global_batch_size: int = 128
    eval_thetas: tuple[float, ...] = (0.25, 0.5)
    multilabel_metrics: str = "auto"  # F1/coverage/mAP: auto = when the eval split has multi-labels; on = required
    eval_every: int = 500
    log_every: int = 50
    checkpoint_every: int = 500
    seed: int = 0
    out_dir: str = "runs/latest"
    device: str = "auto"  # auto = cuda when available
    cuda_graphs: bool = True
    channels_last: bool = True
    bf16: bool = True  # autocast on CUDA; CPU runs fp32

    def __post_init__(self) -> None:
        _require(self.num_steps >= 1, f"--steps must be >= 1, got {self.num_steps}")
        _require(self.global_batch_size >= 1, f"--batch-size must be >= 1, got {self.global_batch_size}")
        for theta in self.eval_thetas:
            _require(0.0 < theta < 1.0, f"--theta values must be in (0, 1), got {theta}")
        _require(self.multilabel_metrics in ("auto", "on", "off"), f"--multilabel-metrics must be auto, on or off, got {self.multilabel_metrics!r}")
        for name in ("eval_every", "log_every", "checkpoint_every"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "method": MethodConfig, "optim": OptimConfig}


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config; unknown keys are errors naming the file and key."""
    if not Path(path).is_file():
        raise ConfigError(f"--config file {path} does not exist")
    try:
        values = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--config {path}: {error}") from None
    _check_keys(values, path)
    return values


def _check_keys(values: dict[str, Any], path: Path) -> None:
    top = {f.name for f in dataclasses.fields(RunConfig)}
    for key, value in values.items():
        if key not in top:
            raise ConfigError(f"{path}: unknown key {key!r}; known: {sorted(top)}")
        if key in _SECTIONS:
            known = {f.name for f in dataclasses.fields(_SECTIONS[key])}
            unknown = set(value) - known
            if unknown:
                raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)} in [{key}]; known: {sorted(known)}")


def build_config(file_values: dict[str, Any], overrides: dict[str, Any]) -> RunConfig:
    """Merge file values and flag overrides (``section.key`` or ``key`` names, None = not given)."""
    merged: dict[str, Any] = {k: dict(v) if k in _SECTIONS else v for k, v in file_values.items()}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.rpartition(".")
        if section:
            merged.setdefault(section, {})[key] = value
        else:
            merged[key] = value
    sections = {name: cls(**merged.pop(name, {})) for name, cls in _SECTIONS.items()}
    if "eval_thetas" in merged:
        merged["eval_thetas"] = tuple(float(t) for t in merged["eval_thetas"])
    return RunConfig(**sections, **merged)


def config_from_json(values: dict[str, Any]) -> RunConfig:
    """Inverse of ``RunConfig.to_json`` (used by ``--resume``)."""
    values = dict(values)
    return build_config(values, {})
