"""A run resolved before it runs: ``plan_run(config, dist, resume) -> RunPlan``.

Everything a run needs to know that the config alone does not say is read and checked here, once,
before a loader starts or a file is written (docs/DESIGN.md, "The path of a run"): the run folder
may be used as asked; the manifests of the train, eval and unlabelled splits (each read once); the
extra eval sets; the step budget of ``num_epochs``; the batch size against every split it reads;
each loader's settings on this rank; what the engine needs to know of the data; the method's kind.
Every problem of the data found here raises ``PlanError``, one line naming the option at fault.
The trainer builds the engine and the loaders from the plan and runs the loop; nothing after it
re-derives what the plan holds.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.build import EngineSpec
from engine.config import Method, MethodConfig, MethodKind, RunConfig, Switch, TrainTargets
from engine.data import PlanError, SplitSource, load_manifest, loader_config, resolve_unlabelled_root, train_source
from engine.distributed import DistInfo
from engine.metrics import EvalAccumulator
from engine.phases import STUDENT, PhasePlan
from engine.run_folder import ClassRecord, RunFolder, class_difference
from engine.scoring import accumulator_for
from pipelines.contract import LoaderConfig, batches_per_epoch
from shards.format import LabelKind
from shards.manifest import ShardError, SplitManifest, load_split, manifest_path

log = logging.getLogger(__name__)

DEFAULT_EXTRA_EVAL_SPLIT = "val"
# Metric names a higher value of which is not better: refused as checkpoint.best_metric.
NOT_A_SCORE = re.compile(r"^(num_.*|coverage@.*|matched_target|theta@matched|m@matched)$")


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


@dataclass(frozen=True)
class RunPlan:
    """A run, resolved and checked (module docstring)."""

    config: RunConfig  # num_steps resolved from num_epochs
    dist: DistInfo
    folder: RunFolder  # owns every path of the run folder
    train: SplitSource
    eval_sets: tuple[EvalSet, ...]  # the run's eval split first, then the --eval-data sets
    unlabelled: SplitSource | None  # the unlabelled split of a semi-supervised MILe run
    train_loader: LoaderConfig  # this rank's; the unlabelled split's loader takes the same
    eval_loader: LoaderConfig  # this rank's, for every eval set
    engine_spec: EngineSpec
    method_kind: MethodKind
    classes: ClassRecord  # the train split's classes: run.json's and every checkpoint's record

    def new_accumulator(self, eval_set: EvalSet) -> EvalAccumulator:
        """A fresh accumulator of one eval point of ``eval_set``, on this rank's device."""
        return accumulator_for(
            eval_set.manifest, self.config.eval_thetas, self.method_kind, eval_set.score_targets, self.dist.device
        )

    def eval_metric_names(self) -> tuple[str, ...]:
        """Every key an eval point reports: the eval split's plain names, then each extra set's NAME/metric."""
        return eval_metric_names(self.eval_sets, self.config, self.method_kind, self.dist.device)


def plan_run(config: RunConfig, dist: DistInfo, resume: bool = False) -> RunPlan:
    """Resolve and check ``config`` on this process (module docstring); writes nothing."""
    folder = RunFolder(config.out_dir, is_main=dist.is_main)
    folder.check_start(resume)  # refuse before any work: another run's folder, or nothing to resume
    train = train_source(config)
    classes = ClassRecord(tuple(train.manifest.class_names), train.manifest.label_kind.value)
    if resume:
        check_recorded_classes(folder.read_record(), classes, folder, config.data.train_split)
    evaluation = load_manifest(train.root, config.data.eval_split)
    score_targets = check_against_data(config, train.manifest, evaluation)
    main_set = EvalSet("", train.root, config.data.eval_split, evaluation, score_targets)
    eval_sets = (main_set, *extra_eval_sets(config, train.manifest, train.root))
    method_kind = config.method.name.kind
    check_best_metric(config.checkpoint.best_metric, eval_metric_names(eval_sets, config, method_kind, dist.device))
    unlabelled = unlabelled_source(config, train)
    check_batch_size(config, dist.world_size, train.manifest, unlabelled)
    train_loader = loader_config(config, True, dist.rank, dist.world_size, dist.device)
    per_epoch = batches_per_epoch(train.manifest.num_samples, train_loader)
    config = steps_from_epochs(config, per_epoch, dist.is_main)
    check_imitation(config.method, config.num_steps, dist.is_main, resume)
    attributes = train.manifest.label_kind is LabelKind.ATTRIBUTES
    return RunPlan(
        config=config,
        dist=dist,
        folder=folder,
        train=train,
        eval_sets=eval_sets,
        unlabelled=unlabelled,
        train_loader=train_loader,
        eval_loader=loader_config(config, False, dist.rank, dist.world_size, dist.device),
        engine_spec=EngineSpec(train.manifest.num_classes, attributes, batches_per_epoch=per_epoch),
        method_kind=method_kind,
        classes=classes,
    )


def check_recorded_classes(recorded: ClassRecord | None, data: ClassRecord, folder: RunFolder, split: str) -> None:
    """A resumed run's outputs must keep meaning the classes they were trained on: the run's record
    (``run.json``) and the train split's class list must agree, names and order. A run of a release
    that wrote no record is resumed on the data's classes, with a warning (docs/DESIGN.md, "The run folder")."""
    if recorded is None:
        log.warning(
            "%s has no %s (a run of an older release): resuming on the classes of split %r as they are now, "
            "unchecked against those the run was trained on",
            folder.root,
            folder.record_path.name,
            split,
        )
        return
    difference = class_difference(recorded.class_names, data.class_names)
    if difference:
        raise PlanError(
            f"--resume: the run in {folder.root} was trained on {len(recorded.class_names)} classes "
            f"(per {folder.record_path}), split {split!r} now has {len(data.class_names)}; {difference}. "
            "Its labels would be remapped: resume on the data it was trained on, or start a new run"
        )


def check_against_data(config: RunConfig, train: SplitManifest, evaluation: SplitManifest) -> bool:
    """Config rules that need the data; True when the eval split's multi-hot targets are to be scored."""
    for key, split, manifest in (
        ("train_split (--train-split)", config.data.train_split, train),
        ("eval_split (--eval-split)", config.data.eval_split, evaluation),
    ):
        if manifest.label_kind is LabelKind.UNLABELLED:
            raise PlanError(
                f"data.{key}: split {split!r} is unlabelled (no ground truth to train or score on); "
                f"use it as data.unlabelled_split (--unlabelled-split) with --method mile"
            )
    if train.label_kind is LabelKind.ATTRIBUTES and config.method.name.kind is MethodKind.SOFTMAX:
        raise PlanError(
            f"--method softmax: split {config.data.train_split!r} holds independent binary attributes "
            f"(no single label per image); use --method sigmoid or mile"
        )
    check_train_targets(config, train)
    has = evaluation.label_kind.has_targets
    if config.multilabel_metrics is Switch.ON and not has:
        raise PlanError(
            f"multilabel_metrics (--multilabel-metrics) on: eval split {config.data.eval_split!r} has no multi-labels "
            f"(label kind {evaluation.label_kind.value}); use a split with multi-label sets or auto"
        )
    return has and config.multilabel_metrics is not Switch.OFF


def check_train_targets(config: RunConfig, train: SplitManifest) -> None:
    """``method.train_targets = label_set`` needs a train split that stores label sets (label kind
    multi: a ``folder`` label file with a ``labels`` column, ImageNet val with ReaL, the digit grid)."""
    if config.method.train_targets is not TrainTargets.LABEL_SET or train.label_kind.has_targets:
        return
    raise PlanError(
        f"method.train_targets (--train-targets) label_set: train split {config.data.train_split!r} has no label "
        f"sets (label kind {train.label_kind.value}); convert it from a label file with a 'labels' column "
        f"(docs/DATASETS.md, 'Your own images') or use --train-targets label"
    )


def unlabelled_source(config: RunConfig, train: SplitSource) -> SplitSource | None:
    """The split of ``data.unlabelled_split`` (None when the run has none), checked against the
    train split: same classes, for the teacher's pseudo-labels index the train split's classes."""
    try:
        root = resolve_unlabelled_root(config.data, train.root)
    except ShardError as error:
        raise PlanError(str(error)) from None
    if root is None:
        return None
    key, name = "data.unlabelled_split (--unlabelled-split)", config.data.unlabelled_split
    try:
        unlabelled = load_split(root, name)
    except ShardError as error:
        raise PlanError(f"{key} {name!r}: {error}") from None
    ours = train.manifest
    if unlabelled.class_names != ours.class_names:
        raise PlanError(
            f"{key} {name!r} in {root} has {unlabelled.num_classes} classes {unlabelled.class_names[:5]}..., not the "
            f"{ours.num_classes} classes {ours.class_names[:5]}... of the train split {config.data.train_split!r}: "
            f"pseudo-labels would index other classes; convert both from one dataset"
        )
    return SplitSource(root, unlabelled)


def check_batch_size(config: RunConfig, world_size: int, train: SplitManifest, unlabelled: SplitSource | None) -> None:
    """The global batch splits evenly over the processes, and each process gets at least one full
    batch of every split it trains on."""
    batch = config.global_batch_size
    if batch % world_size:
        raise PlanError(f"--batch-size {batch} is not divisible by {world_size} processes")
    per_rank_samples = train.num_samples // world_size
    if batch // world_size > per_rank_samples:
        raise PlanError(
            f"global_batch_size (--batch-size) {batch} is larger than the training split "
            f"{config.data.train_split!r}, which holds {train.num_samples} samples"
            f"{f' ({per_rank_samples} per process)' if world_size > 1 else ''}; use a smaller --batch-size"
        )
    if unlabelled is not None and batch // world_size > unlabelled.manifest.num_samples // world_size:
        raise PlanError(
            f"global_batch_size (--batch-size) {batch} is larger than data.unlabelled_split (--unlabelled-split) "
            f"{config.data.unlabelled_split!r}, which holds {unlabelled.manifest.num_samples} samples; "
            f"use a smaller --batch-size"
        )


def steps_from_epochs(config: RunConfig, batches_per_epoch: int, is_main: bool = True) -> RunConfig:
    """``config`` with ``num_steps`` = ``num_epochs`` x full training batches per epoch when
    ``num_epochs`` is set (the split's size is known only here); unchanged otherwise."""
    if config.num_epochs == 0:
        return config
    num_steps = config.num_epochs * batches_per_epoch
    if is_main:
        log.info(
            "num_epochs %d x %d batches per epoch = %d optimizer steps", config.num_epochs, batches_per_epoch, num_steps
        )
    return dataclasses.replace(config, num_steps=num_steps)


def check_imitation(method: MethodConfig, num_steps: int, is_main: bool = True, resume: bool = False) -> None:
    """A MILe run must reach an imitation phase (else it is a sigmoid run under another name): a
    PlanError at its start (a resumed run, already trained, is warned). A run that ends in an
    interaction phase is warned about, with the step counts that would end it right after an
    imitation phase (docs/DESIGN.md, "MILe phases")."""
    if method.name is not Method.MILE:
        return
    first_teacher = method.warmup_steps + method.k_teacher_steps
    period = method.k_teacher_steps + method.k_student_steps
    budget = (
        f"method.warmup_steps (--warmup-steps) {method.warmup_steps} + method.k_teacher_steps (--k-teacher-steps) "
        f"{method.k_teacher_steps}"
    )
    if num_steps <= first_teacher:
        problem = (
            f"--method mile never imitates in num_steps (--steps) {num_steps}: the first interaction phase lasts "
            f"{budget} = {first_teacher} steps, then method.k_student_steps (--k-student-steps) "
            f"{method.k_student_steps} of imitation; use --steps {first_teacher + method.k_student_steps} or more, "
            "or a shorter warm-up or teacher phase (or --method sigmoid)"
        )
        if not resume:
            raise PlanError(problem)
        if is_main:
            log.warning("%s", problem)
        return
    if not is_main or PhasePlan(method).position(num_steps - 1).phase is STUDENT:
        return
    cycles = (num_steps - first_teacher - method.k_student_steps) // period  # whole imitation phases after the first
    before = first_teacher + cycles * period + method.k_student_steps
    log.warning(
        "--method mile: the run ends in an interaction (teacher) phase at step %d, so the final model has "
        "trained on the labels since the last imitation phase ended at step %d (%s = %d teacher steps first, "
        "then %d student and %d teacher steps per cycle); --steps %d or %d ends it right after an imitation phase",
        num_steps,
        before,
        budget,
        first_teacher,
        method.k_student_steps,
        method.k_teacher_steps,
        before,
        before + period,
    )


def eval_metric_names(
    eval_sets: tuple[EvalSet, ...], config: RunConfig, method_kind: MethodKind, device: torch.device
) -> tuple[str, ...]:
    return tuple(
        s.key(name)
        for s in eval_sets
        for name in accumulator_for(s.manifest, config.eval_thetas, method_kind, s.score_targets, device).metric_names()
    )


def check_best_metric(name: str, available: tuple[str, ...]) -> None:
    """``checkpoint.best_metric`` must be one of the run's eval metrics for which higher is better."""
    if not name:
        return
    scores = [metric for metric in available if not NOT_A_SCORE.match(metric)]
    if name not in scores:
        raise PlanError(
            f"checkpoint.best_metric (--best-metric) {name!r} is not a score this run's evaluation reports; "
            f"choose one of {', '.join(scores)}"
        )


# -- eval sets ---------------------------------------------------------------------------------


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
            problem = "is not a folder" if root.exists() else "does not exist"
            raise PlanError(f"data.extra_eval (--eval-data) {spec!r}: {root} {problem}")
        try:
            manifest = load_split(root, split)
        except ShardError as error:
            raise PlanError(f"data.extra_eval (--eval-data) {spec!r}: {error}") from None
        if manifest.label_kind is LabelKind.UNLABELLED:
            raise PlanError(
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
    difference = class_difference(theirs, ours)
    if difference is None:
        return
    raise PlanError(
        f"data.extra_eval (--eval-data) {spec!r}: split {manifest.name!r} of {manifest_path(root)} "
        f"has {len(theirs)} classes, split {train.name!r} of {manifest_path(train_root)} (the train split) "
        f"has {len(ours)}; {difference}. Convert the eval set with the train split's class list, in its order: "
        "for ImageNet val with a WebVision model, `make-shards webvision --write-class-list classes.txt ...` "
        "then `make-shards imagenet --class-list classes.txt ...`; an image folder split written with "
        "`make-shards folder --out` into the train split's folder reuses its classes"
    )


def run_scores(config: RunConfig) -> tuple[str, ...]:
    """The scores (higher is better) a run of ``config`` reports at each eval point and in its summary,
    from its data's manifests alone: what a sweep's ``select_by`` may name, checked before any run trains."""
    train = train_source(config)
    evaluation = load_manifest(train.root, config.data.eval_split)
    main_set = EvalSet(
        "", train.root, config.data.eval_split, evaluation, check_against_data(config, train.manifest, evaluation)
    )
    eval_sets = (main_set, *extra_eval_sets(config, train.manifest, train.root))
    names = eval_metric_names(eval_sets, config, config.method.name.kind, torch.device("cpu"))
    return tuple(name for name in names if not NOT_A_SCORE.match(name))
