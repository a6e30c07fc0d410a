"""Run configuration: the schema every knob is defined in, once.

One small frozen dataclass per component, assembled into ``RunConfig``. Each field is declared with
``knob(...)``: its default, help text, bounds, an optional short flag and whether it may change when a
run is resumed. Everything else is derived from that declaration (docs/DESIGN.md, "Configuration"):

- the TOML key is the field's dotted path (``optim.lr_per_256``; top-level keys have no section);
- the command-line flag is ``--`` + that key (``--optim.lr_per_256``) plus the short alias (``--lr``);
- the run folder's ``config.toml`` is ``to_toml(config)``, which ``--config`` reads back unchanged.

Values are checked strictly (an int key refuses ``30.5``, a bool key refuses ``"yes"``), and every
error names the key and its flag.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad option; the message names the TOML key and its flag."""


class Choice(str, enum.Enum):
    """A string-valued choice: prints, formats and compares as its value ("mile", not "Method.MILE")."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class MethodKind(Choice):
    """How a method's model scores classes and forms prediction sets: ``softmax`` (one class per
    image, the set is {argmax}) or ``sigmoid`` (independent classes: argmax plus every class over theta)."""

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class Method(Choice):
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"
    MILE = "mile"

    @property
    def kind(self) -> MethodKind:
        """Softmax is its own kind; sigmoid and MILe (whose learner is a sigmoid model) are ``sigmoid``."""
        return MethodKind.SOFTMAX if self is Method.SOFTMAX else MethodKind.SIGMOID


class TrainTargets(Choice):
    """What the supervised (sigmoid, MILe interaction) steps of a classification split train on."""

    LABEL = "label"  # the single given label, one-hot (the paper's setting)
    LABEL_SET = "label_set"  # the split's multi-label set (multi-hot), the given label included


class StudentInit(Choice):
    TEACHER = "teacher"  # continue from the teacher's weights (the released code)
    PREVIOUS = "previous"  # restore the student's own weights and momentum (Algorithm 1)


class ImitationTargets(Choice):
    HARD = "hard"  # 1[sigmoid(teacher) > rho]: the paper and the released code
    SOFT = "soft"  # sigmoid(teacher) itself: an extension, in neither (docs/TUNING.md, "Two grids")


class Schedule(Choice):
    COSINE = "cosine"
    STEP = "step"
    CONSTANT = "constant"


class MilestoneUnit(Choice):
    STEPS = "steps"  # optimizer steps, counted from 0
    EPOCHS = "epochs"  # whole passes over the train split (x its full batches per epoch)


class Backend(Choice):
    AUTO = "auto"  # DALI when it imports, else torch
    DALI = "dali"
    TORCH = "torch"


class EvalPrecision(Choice):
    BF16 = "bf16"  # bf16 autocast on CUDA, as training (CPU evaluation is fp32 either way)
    FP32 = "fp32"  # autocast off and fp32 images in evaluation


# The general (photo-sized) base of a run on a user's data: the schema's defaults (docs/DESIGN.md,
# "Configuration"); the digit grid's own settings live in engine/configs/digits_grid.toml.
PHOTO_IMAGE_SIZE_PX = 224

# Architectures built without timm; resnet18/resnet50 are torchvision's although timm has the names too.
BUILTIN_ARCHS = ("grid_cnn", "resnet18", "resnet50")


class Switch(Choice):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


def knob(
    default: Any,
    help: str,
    *,
    alias: str | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    resume_safe: bool = False,
    allow_empty: bool = False,
) -> Any:
    """Declare a config field: everything the CLI, the TOML reader and the validator need.
    ``allow_empty``: a list key that may be empty (lists must hold at least one value otherwise)."""
    bounds = {name: value for name, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if value is not None}
    metadata = {"help": help, "alias": alias, "bounds": bounds, "resume_safe": resume_safe, "allow_empty": allow_empty}
    return field(default=default, metadata=metadata)


class _Component:
    """A config section: values are normalised to their declared types and checked on creation."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _normalise(self, self.SECTION)


@dataclass(frozen=True)
class DataConfig(_Component):
    """Where the shards are and how batches are made."""

    SECTION: ClassVar[str] = "data"

    root: str = knob(
        "", "Shard folder (with manifest.json); empty = the embedded digit grid, built on first use.", alias="--data"
    )
    train_split: str = knob("train", "Split to train on.", alias="--train-split")
    eval_split: str = knob("val", "Split to evaluate on.", alias="--eval-split")
    unlabelled_split: str = knob(
        "",
        "MILe semi-supervised: imitation (student) phases train on this split's images, pseudo-labelled by the "
        "teacher, and never read its labels; interaction (teacher) phases train on train_split. Empty = off.",
        alias="--unlabelled-split",
    )
    unlabelled_root: str = knob(
        "",
        "Shard folder of unlabelled_split; empty = the folder of the train split (data.root).",
        alias="--unlabelled-data",
    )
    # resume-safe: another eval set changes what is measured, never what is trained
    extra_eval: tuple[str, ...] = knob(
        (),
        "More eval sets, scored at every eval point besides eval_split: DIR (split val) or DIR:SPLIT of a shard folder "
        "with the train split's classes in the same order; metrics as NAME/metric (NAME = the folder's name/SPLIT). "
        "Repeat the flag for several.",
        alias="--eval-data",
        allow_empty=True,
        resume_safe=True,
    )
    image_size_px: int = knob(
        PHOTO_IMAGE_SIZE_PX,
        f"Image side in pixels. Unset on your own data: {PHOTO_IMAGE_SIZE_PX}, or the data's own size (the shorter "
        "side of its first images) when smaller.",
        alias="--image-size",
        ge=8,
    )
    augment: bool = knob(
        True,
        "Random-resized-crop + flip in training (off for the digit grid: crops remove digits).",
        alias="--augment",
    )
    crop_scale_min: float = knob(
        0.08, "Smallest random-resized-crop area, as a fraction of the image.", alias="--crop-scale-min", gt=0, le=1
    )
    eval_crop_fraction: float = knob(
        0.0,
        "Eval: resize the shorter side to size/fraction, centre-crop size; 0 = auto (0.875 with --augment, else 1).",
        alias="--eval-crop",
        ge=0,
        le=1,
    )
    backend: Backend = knob(Backend.AUTO, "Input pipeline.", alias="--loader")
    num_workers: int = knob(
        -1,
        "Loader worker processes (torch; 0 = in the main process) or threads (DALI); -1 = auto: the CPU cores this "
        "process may use divided by the processes on this machine (LOCAL_WORLD_SIZE).",
        alias="--workers",
        ge=-1,
        resume_safe=True,
    )
    verify_data: bool = knob(
        False,
        "Check every shard's sha256 against the manifest before training (reads all data once).",
        alias="--verify-data",
        resume_safe=True,
    )

    @property
    def resolved_eval_crop_fraction(self) -> float:
        if self.eval_crop_fraction > 0:
            return self.eval_crop_fraction
        return 0.875 if self.augment else 1.0


@dataclass(frozen=True)
class MethodConfig(_Component):
    """Which loss and, for MILe, the phase machine (docs/DESIGN.md, "MILe phases")."""

    SECTION: ClassVar[str] = "method"

    name: Method = knob(Method.MILE, "Training method.", alias="--method")
    k_teacher_steps: int = knob(100, "MILe: steps per interaction (teacher) phase.", alias="--k-teacher-steps", ge=1)
    k_student_steps: int = knob(50, "MILe: steps per imitation (student) phase.", alias="--k-student-steps", ge=1)
    rho: float = knob(
        0.25, "MILe: pseudo-label threshold, target = 1[sigmoid(teacher(x)) > rho].", alias="--rho", gt=0, lt=1
    )
    train_targets: TrainTargets = knob(
        TrainTargets.LABEL,
        "Sigmoid and MILe's interaction (teacher) steps train BCE on: label = the single given label, one-hot "
        "(the paper's setting); label_set = the train split's label sets, multi-hot (the given label included; "
        "needs a split with a labels column; not with softmax). Attribute splits train on their attributes either way.",
        alias="--train-targets",
    )
    student_init: StudentInit = knob(
        StudentInit.TEACHER, "MILe: where each imitation phase starts.", alias="--student-init"
    )
    warmup_steps: int = knob(
        0, "MILe: teacher-only steps before the first imitation phase.", alias="--warmup-steps", ge=0
    )
    imitation_targets: ImitationTargets = knob(
        ImitationTargets.HARD,
        "MILe: the student's BCE targets: hard = 1[sigmoid(teacher) > rho] (the paper); soft = the teacher's "
        "sigmoid probabilities (an extension, not in the paper or the released code; rho then only sets the "
        "pseudo-label statistics).",
        alias="--imitation-targets",
    )
    imitation_add_label: bool = knob(
        False,
        "MILe: add the given label to the teacher's pseudo-labels in imitation steps (an option of the released "
        "code, off there by default; not in the paper).",
        alias="--imitation-add-label",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_targets is TrainTargets.LABEL_SET and self.name is Method.SOFTMAX:
            raise ConfigError(
                "method.train_targets (--train-targets) label_set: method.name (--method) softmax trains on one "
                "class per image; use --method sigmoid or mile to train on label sets"
            )

    @property
    def multi_label_head(self) -> bool:
        return self.name.kind is MethodKind.SIGMOID


@dataclass(frozen=True)
class OptimConfig(_Component):
    """SGD with momentum; learning rate per 256 images, warmup then decay, all per step."""

    SECTION: ClassVar[str] = "optim"

    lr_per_256: float = knob(
        0.1, "Learning rate per 256 images (scaled by the global batch size).", alias="--lr", gt=0, le=100
    )
    momentum: float = knob(0.9, "SGD momentum.", alias="--momentum", ge=0, lt=1)
    nesterov: bool = knob(False, "Nesterov momentum.", alias="--nesterov")
    weight_decay: float = knob(5e-4, "SGD weight decay.", alias="--weight-decay", ge=0, le=1)
    schedule: Schedule = knob(Schedule.COSINE, "Learning-rate decay after the warmup.", alias="--schedule")
    warmup_lr_steps: int = knob(0, "Linear learning-rate warmup steps.", alias="--warmup-lr-steps", ge=0)
    step_decay_every: int = knob(
        0, "Step schedule: multiply the rate by step_decay_factor every N steps.", alias="--step-decay-every", ge=0
    )
    lr_milestones: tuple[int, ...] = knob(
        (),
        "Step schedule: multiply the rate by step_decay_factor at each of these points (in optim.lr_milestones_unit; "
        "repeat the flag for several); instead of step_decay_every.",
        alias="--lr-milestones",
        ge=1,
        allow_empty=True,
    )
    lr_milestones_unit: MilestoneUnit = knob(
        MilestoneUnit.STEPS,
        "Unit of optim.lr_milestones: optimizer steps, or epochs of the train split "
        "(the paper's baselines decay at epochs 30, 60, 80).",
        alias="--lr-milestones-unit",
    )
    step_decay_factor: float = knob(0.1, "Step schedule: the factor.", alias="--step-decay-factor", gt=0, le=1)
    head_lr_scale: float = knob(
        1.0,
        "The classifier's learning rate as a multiple of the backbone's (e.g. 10 when fine-tuning from "
        "--init-checkpoint).",
        alias="--head-lr-scale",
        ge=0,
        le=1000,
    )


@dataclass(frozen=True)
class CheckpointConfig(_Component):
    """Which checkpoints a run keeps besides ``checkpoints/last.pt`` (docs/DESIGN.md, "Checkpoints")."""

    SECTION: ClassVar[str] = "checkpoint"

    keep_last: int = knob(
        0,
        "Also keep the last N checkpoints as checkpoints/step-XXXXXXX.pt (last.pt is the newest of them); 0 = "
        "last.pt only.",
        alias="--keep-checkpoints",
        ge=0,
        resume_safe=True,
    )
    best_metric: str = knob(
        "",
        "Also keep checkpoints/best.pt: the state at the evaluation with the highest value of this eval metric "
        "(e.g. lrap, top1, f1@matched, f1@0.25); empty = off.",
        alias="--best-metric",
    )


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    arch: str = knob(
        "resnet18",
        f"Model architecture: {' | '.join(BUILTIN_ARCHS)}, or any timm model name (timm.list_models()); never "
        "downloads weights.",
        alias="--arch",
    )
    init_checkpoint: str = knob(
        "",
        "Start the backbone from these weights: a state dict (.pt/.pth), a .safetensors file or a run's checkpoint; "
        "MoCo/SimCLR/BYOL/SwAV prefixes are mapped; the classifier is re-initialised. Empty = random init.",
        alias="--init-checkpoint",
    )
    # resume-safe so a run can be extended; the cosine schedule then stretches over the new total
    num_steps: int = knob(3000, "Optimizer steps in total.", alias="--steps", ge=1, resume_safe=True)
    num_epochs: int = knob(
        0,
        "Epochs of the train split instead of num_steps (steps = epochs x full batches per epoch); 0 = use num_steps.",
        alias="--epochs",
        ge=0,
        resume_safe=True,
    )
    global_batch_size: int = knob(128, "Images per step over all processes.", alias="--batch-size", ge=1)
    eval_thetas: tuple[float, ...] = knob(
        (0.25, 0.5), "Eval threshold(s) for F1 and coverage; repeat the flag for several.", alias="--theta", gt=0, lt=1
    )
    multilabel_metrics: Switch = knob(
        Switch.AUTO,
        "F1/coverage/mAP: auto = when the eval split has multi-labels; on = require them.",
        alias="--multilabel-metrics",
    )
    eval_every: int = knob(
        500, "Evaluate every N steps (and at the end).", alias="--eval-every", ge=1, resume_safe=True
    )
    eval_phase_ends: bool = knob(
        True,
        "MILe: also score the learner on the eval split at the end of every teacher and student phase "
        "('phase_eval' records in metrics.jsonl, with the pseudo-labels it would pass on at rho).",
        alias="--eval-phase-ends",
        resume_safe=True,
    )
    log_every: int = knob(50, "Log train loss and images/s every N steps.", alias="--log-every", ge=1, resume_safe=True)
    checkpoint_every: int = knob(
        500,
        "Checkpoint every N steps (and at the end or on a signal).",
        alias="--checkpoint-every",
        ge=1,
        resume_safe=True,
    )
    seed: int = knob(0, "Seed of the weights, data order and augmentation.", alias="--seed", ge=0)
    out_dir: str = knob("runs/latest", "Run folder.", alias="--out", resume_safe=True)
    device: str = knob("auto", "auto (cuda when available) | cpu | cuda | cuda:N.", alias="--device", resume_safe=True)
    cuda_graphs: bool = knob(
        True, "Capture the steps as CUDA graphs (CUDA only).", alias="--cuda-graphs", resume_safe=True
    )
    channels_last: bool = knob(True, "Channels-last memory format for images and weights.", alias="--channels-last")
    bf16: bool = knob(True, "bf16 autocast on CUDA (CPU runs are fp32).", alias="--bf16")
    eval_precision: EvalPrecision = knob(
        EvalPrecision.BF16,
        "Evaluation precision on CUDA: bf16 (autocast, as training) or fp32 (autocast off).",
        alias="--eval-precision",
        resume_safe=True,
    )
    sync_bn: bool = knob(
        False,
        "Multi-process runs: SyncBatchNorm in the learner, so BatchNorm normalises over the global batch and a run "
        "trains alike on any number of processes (the teacher is never converted).",
        alias="--sync-bn",
    )
    ddp_bf16_grads: bool = knob(
        False,
        "Multi-process runs: all-reduce gradients in bf16 (DDP's bf16 compression hook): half the bytes, "
        "gradients rounded to bf16.",
        alias="--ddp-bf16-grads",
    )

    def __post_init__(self) -> None:
        _normalise(self, "")
        _check_combinations(self)

    def to_json(self) -> dict[str, Any]:
        """Plain values (enums as their strings): what TOML and JSON hold."""
        return _plain(dataclasses.asdict(self))


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "method": MethodConfig,
    "optim": OptimConfig,
    "checkpoint": CheckpointConfig,
}
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


# -- the schema, walked -----------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One config key: its dotted name, its field and its Python type."""

    name: str  # "optim.lr_per_256", or "num_steps" at the top level
    field: dataclasses.Field
    type: Any

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def alias(self) -> str | None:
        return self.field.metadata.get("alias")

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")

    @property
    def bounds(self) -> dict[str, float]:
        """``{"ge" | "gt" | "le" | "lt": bound}`` as declared."""
        return self.field.metadata.get("bounds", {})

    @property
    def resume_safe(self) -> bool:
        return bool(self.field.metadata.get("resume_safe"))

    def label(self) -> str:
        """How errors name the key: the TOML key and its flags."""
        flags = " / ".join(dict.fromkeys(f for f in (self.flag, self.alias) if f))
        return f"{self.name} ({flags})"


def _keys_of(cls: type, prefix: str) -> Iterator[Key]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in SECTIONS and not prefix:
            continue
        yield Key(f"{prefix}{f.name}", f, hints[f.name])


def config_keys() -> list[Key]:
    """Every key of the schema, sections first, in declaration order."""
    keys: list[Key] = []
    for section, cls in SECTIONS.items():
        keys.extend(_keys_of(cls, f"{section}."))
    keys.extend(_keys_of(RunConfig, ""))
    return keys


def key_by_name() -> dict[str, Key]:
    return {key.name: key for key in config_keys()}


# -- strict values and bounds ----------------------------------------------------------------


def coerce(key: Key, value: Any) -> Any:
    """``value`` (from TOML, JSON or a flag) as the key's type, or a ConfigError naming the key."""
    kind = key.type
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        choices = [member.value for member in kind]
        if isinstance(value, kind):
            return value
        if isinstance(value, str) and value in choices:
            return kind(value)
        raise ConfigError(f"{key.label()}: {value!r} is not one of {choices}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key.label()}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key.label()}: expected a whole number, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # inf or nan would only show as a non-finite loss, steps later
                raise ConfigError(f"{key.label()}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{key.label()}: expected a number, got {value!r}")
    if kind is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"{key.label()}: expected a string, got {value!r}")
    if typing.get_origin(kind) is tuple:
        item_type = typing.get_args(kind)[0]
        allow_empty = key.field.metadata.get("allow_empty", False)
        if not isinstance(value, (list, tuple)) or not (value or allow_empty):
            what = {int: "whole numbers", str: "strings"}.get(item_type, "numbers")
            raise ConfigError(
                f"{key.label()}: expected a {'' if allow_empty else 'non-empty '}list of {what}, got {value!r}"
            )
        return tuple(coerce(Key(key.name, key.field, item_type), item) for item in value)
    raise TypeError(f"config key {key.name}: unsupported type {kind!r}")  # a schema bug, not a user error


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_TEST = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def bounds_problem(bounds: dict[str, float], value: Any) -> str | None:
    """What is wrong with one value under a knob's ``bounds`` ("must be > 0 and < 1, got 1.5"); None if nothing."""
    if all(_BOUND_TEST[name](value, bound) for name, bound in bounds.items()):
        return None
    allowed = " and ".join(f"{_BOUND_TEXT[name]} {bound:g}" for name, bound in bounds.items())
    return f"must be {allowed}, got {value}"


def _check_bounds(key: Key, value: Any) -> None:
    for item in value if isinstance(value, tuple) else (value,):
        if (problem := bounds_problem(key.bounds, item)) is not None:
            raise ConfigError(f"{key.label()} {problem}")


def _normalise(instance: Any, section: str) -> None:
    """Coerce every field of one component to its declared type (so ``MethodConfig(name="mile")``
    holds ``Method.MILE``) and check its bounds; runs in ``__post_init__``."""
    for key in _keys_of(type(instance), f"{section}." if section else ""):
        value = coerce(key, getattr(instance, key.field.name))
        object.__setattr__(instance, key.field.name, value)  # frozen: set once, at creation
        _check_bounds(key, value)


def _check_combinations(config: RunConfig) -> None:
    """Rules that involve two keys, or a pattern rather than a range."""
    if (problem := device_problem(config.device)) is not None:
        raise ConfigError(f"device (--device) {problem}")
    if config.optim.nesterov and config.optim.momentum == 0:
        raise ConfigError("optim.nesterov (--nesterov) needs optim.momentum (--momentum) > 0")
    _check_step_schedule(config.optim)
    _check_unlabelled(config)
    check_arch(config.arch)
    if not config.out_dir:
        raise ConfigError("out_dir (--out) must not be empty")


def _check_unlabelled(config: RunConfig) -> None:
    """An unlabelled split feeds MILe's imitation phases; the baselines have none to feed."""
    data = config.data
    if data.unlabelled_root and not data.unlabelled_split:
        raise ConfigError("data.unlabelled_root (--unlabelled-data) needs data.unlabelled_split (--unlabelled-split)")
    if data.unlabelled_split and config.method.name is not Method.MILE:
        raise ConfigError(
            f"data.unlabelled_split (--unlabelled-split) {data.unlabelled_split!r}: method.name (--method) "
            f"{config.method.name} has no imitation phase to train on unlabelled images; use --method mile"
        )


def device_problem(name: str) -> str | None:
    """What is wrong with a device name (the ``device`` key, or any command's --device); None if nothing."""
    return None if _DEVICE_PATTERN.match(name) else f"must be auto, cpu, cuda or cuda:N, got {name!r}"


LOADER_WORKERS_PER_CORE = 4  # more loader processes or threads than this per core only contend (and exhaust memory)


def check_loader_workers(num_workers: int, flag: str = "--workers") -> None:
    """Loader workers are processes (torch) or threads (DALI): bound them by the CPU cores this
    process may run on, so that a mistyped count is refused here rather than hanging the machine
    (torch forking 100000 workers) or aborting the process (DALI's thread pool)."""
    cores = len(os.sched_getaffinity(0))
    limit = LOADER_WORKERS_PER_CORE * cores
    if num_workers > limit:
        raise ConfigError(
            f"{flag} {num_workers} is more than this machine can run: at most {limit} ({LOADER_WORKERS_PER_CORE} per "
            f"CPU core, {cores} cores available to this process); -1 = auto"
        )


def _check_step_schedule(optim: OptimConfig) -> None:
    """The step schedule decays either every N steps or at listed milestones: exactly one of them."""
    every, milestones = optim.step_decay_every, optim.lr_milestones
    if optim.schedule is not Schedule.STEP:
        if milestones:
            raise ConfigError(
                f"optim.lr_milestones (--lr-milestones) {list(milestones)} is used by optim.schedule = step only, "
                f"not {optim.schedule}"
            )
        return
    if every == 0 and not milestones:
        raise ConfigError(
            "optim.schedule = step needs optim.step_decay_every (--step-decay-every) > 0 or optim.lr_milestones "
            "(--lr-milestones)"
        )
    if every and milestones:
        raise ConfigError(
            "optim.schedule = step: give optim.step_decay_every (--step-decay-every) or optim.lr_milestones "
            "(--lr-milestones), not both"
        )
    if list(milestones) != sorted(set(milestones)):
        raise ConfigError(f"optim.lr_milestones (--lr-milestones) must be strictly increasing, got {list(milestones)}")


def check_arch(name: str) -> None:
    """``name`` is a built-in architecture or a timm model name; else an error listing close matches.
    timm is imported only for names that are not built in (importing it takes seconds)."""
    if name in BUILTIN_ARCHS:
        return
    import difflib

    import timm

    known = timm.list_models()
    if name in known:
        return
    close = difflib.get_close_matches(name, list(dict.fromkeys([*BUILTIN_ARCHS, *known])), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ConfigError(
        f"arch (--arch): {name!r} is not one of {', '.join(BUILTIN_ARCHS)} nor a timm model name{hint} "
        f"(timm.list_models() lists every timm name)"
    )


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- building a config from TOML and flags ------------------------------------------------------

DEFAULT_CONFIG = "digits_grid.toml"  # the digit grid's base: engine-run on the grid, and the demo


def packaged_config(name: str) -> Path:
    """A config shipped in ``engine/configs/`` (``name`` relative to it, e.g. ``demo/methods.toml``)."""
    from importlib import resources

    return Path(str(resources.files("engine") / "configs" / name))


def default_config_path() -> Path:
    return packaged_config(DEFAULT_CONFIG)


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file's table; a missing or malformed file is a ConfigError naming ``what`` it is
    ("--config file", "sweep file") and the path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{what} {path}: not valid TOML ({error})") from None


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config; unknown keys are errors naming the file and key."""
    values = read_toml(path, "--config file")
    flatten(values, source=str(path))  # raises on unknown keys
    return values


def flatten(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Nested TOML tables -> ``{"section.key": value}``; unknown keys are errors naming ``source``."""
    known = key_by_name()
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if name in SECTIONS and not isinstance(value, dict):
            raise ConfigError(f"{source}: {name} must be a table ([{name}]), got {value!r}")
        if isinstance(value, dict):  # a section, or a misspelt one: its keys are reported below
            flat.update({f"{name}.{sub}": sub_value for sub, sub_value in value.items()})
        else:
            flat[name] = value
    for name in flat:
        if name not in known:
            near = [k for k in known if k.split(".")[-1] == name.split(".")[-1]]
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{source}: unknown key {name!r}{hint} (engine-run --help lists every key)")
    return flat


def build_config(file_values: dict[str, Any], overrides: dict[str, Any], source: str = "config") -> RunConfig:
    """Defaults < file values (nested TOML tables) < overrides (``{"section.key": value}``; None = not given)."""
    known = key_by_name()
    merged = flatten(file_values, source)
    for name, value in overrides.items():
        if name not in known:
            raise ConfigError(f"unknown config key {name!r}")
        if value is not None:
            merged[name] = value
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    top: dict[str, Any] = {}
    for name, value in merged.items():
        key = known[name]
        section, _, field_name = name.rpartition(".")
        (sections[section] if section else top)[field_name] = coerce(key, value)
    built = {name: cls(**sections[name]) for name, cls in SECTIONS.items()}
    return RunConfig(**built, **top)


def to_toml(config: RunConfig, header: str = "") -> str:
    """The config as TOML that ``load_toml`` + ``build_config`` turn back into an equal config."""
    values = config.to_json()
    ordered = {k: v for k, v in values.items() if k not in SECTIONS}
    ordered.update({k: values[k] for k in SECTIONS})
    return header + tomli_w.dumps(ordered)


def changed_keys(old: RunConfig, new: RunConfig) -> list[tuple[Key, Any, Any]]:
    """Keys whose values differ between two configs, with both values."""
    old_flat, new_flat = flatten(old.to_json(), "old"), flatten(new.to_json(), "new")
    return [
        (key, old_flat[key.name], new_flat[key.name])
        for key in config_keys()
        if old_flat[key.name] != new_flat[key.name]
    ]


# -- a config from layers, each value's source kept ------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One source of config values (``{"section.key": value}``, None = not set); later layers win."""

    source: str  # how the log names it: "digit grid (engine/configs/digits_grid.toml)", "--config x.toml", "flags"
    values: dict[str, Any]


def build_layered(layers: list[Layer]) -> tuple[RunConfig, dict[str, str]]:
    """Schema defaults < each layer in turn; the config and, per key a layer set, that layer's source."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for layer in layers:
        for name, value in layer.values.items():
            if value is not None:
                merged[name] = value
                sources[name] = layer.source
    return build_config({}, merged), sources


def non_default_values(config: RunConfig, sources: dict[str, str]) -> list[tuple[str, Any, str]]:
    """(key, value, source) for every key whose value is not the schema's default, in schema order."""
    default = flatten(RunConfig().to_json(), "defaults")
    values = flatten(config.to_json(), "config")
    return [
        (key.name, values[key.name], sources.get(key.name, "?"))
        for key in config_keys()
        if values[key.name] != default[key.name]
    ]
