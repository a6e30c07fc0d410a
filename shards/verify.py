"""Verifying a shard folder: checksums, counts against manifest and index files, every image decoded.

``verify_root`` never stops at the first problem: it reports every damaged shard, index file and
sample it finds, each named by file (and sample key and source file where there is one).
"""

from __future__ import annotations

import json
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards.format import (
    FIELD_IMAGE,
    FIELD_META,
    FIELD_TARGETS,
    TARGETS_DTYPE,
    FormatError,
    LabelKind,
    decode_sample,
    fields_for,
)
from shards.images import ImagePolicy, UnreadableImage, sanitize
from shards.manifest import ShardError, ShardRecord, SplitManifest, check_shard, load_splits, manifest_path
from shards.parallel import ordered_map
from shards.progress import Progress
from shards.tar_io import Member, read_index, split_name
from shards.writer import PROGRESS_NAME, first_class_difference, writer_file_pattern

_CHECK_ONLY = ImagePolicy()  # sanitize with no resize: returns the bytes untouched when they are fine


@dataclass(frozen=True)
class Problem:
    """One thing wrong, and the file it is in."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class ShardCheck:
    """What verifying one shard found."""

    num_samples: int = 0
    num_decoded: int = 0
    problems: list[Problem] = field(default_factory=list)


@dataclass
class VerifyReport:
    """The whole folder's result; ``ok`` is False when any problem was found."""

    num_shards: int = 0
    num_samples: int = 0
    num_decoded: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class _ShardTask:
    """One shard to verify, picklable for worker processes."""

    root: Path
    split: str
    kind: LabelKind
    num_classes: int
    shard: ShardRecord
    shard_number: int
    sample_fraction: float
    seed: int


def verify_root(
    root: Path, sample_fraction: float = 1.0, seed: int = 0, workers: int = 1, progress: bool = True
) -> VerifyReport:
    """Check every split of ``root/manifest.json``; decode ``sample_fraction`` of the images."""
    if not 0.0 <= sample_fraction <= 1.0:
        raise ValueError(f"sample fraction must be in [0, 1], got {sample_fraction}")
    started = time.perf_counter()
    root = Path(root)
    splits = load_splits(root)
    report = VerifyReport(
        problems=mixed_datasets(root, splits) + [p for s in splits.values() for p in stray_files(root, s)]
    )
    tasks = [task for s in splits.values() for task in _tasks(root, s, sample_fraction, seed)]
    total = sum(t.shard.num_samples for t in tasks)
    with Progress(total, "verify", "img", enabled=progress) as bar:
        for task, check in zip(tasks, ordered_map(verify_shard, tasks, workers, chunk_size=1)):
            report.num_shards += 1
            report.num_samples += check.num_samples
            report.num_decoded += check.num_decoded
            report.problems += check.problems
            bar.update(task.shard.num_samples)
    report.seconds = time.perf_counter() - started
    return report


def _tasks(root: Path, split: SplitManifest, sample_fraction: float, seed: int) -> list[_ShardTask]:
    return [
        _ShardTask(root, split.name, split.label_kind, split.num_classes, shard, number, sample_fraction, seed)
        for number, shard in enumerate(split.shards)
    ]


def mixed_datasets(root: Path, splits: dict[str, SplitManifest]) -> list[Problem]:
    """Splits whose class lists differ from the first split's: two datasets in one folder (a label
    index would mean one class in training and another in evaluation)."""
    names = sorted(splits)
    if not names:
        return []
    first = splits[names[0]]
    problems = []
    for name in names[1:]:
        difference = first_class_difference(first.class_names, splits[name].class_names, repr(first.name), repr(name))
        if difference is not None:
            problems.append(
                Problem(
                    str(manifest_path(root)),
                    f"splits {first.name!r} and {name!r} have different classes ({difference}): two datasets in "
                    "one folder; convert one of them into another --out, or again with --overwrite",
                )
            )
    return problems


def stray_files(root: Path, split: SplitManifest) -> list[Problem]:
    """Shard files named as the converter names them that the manifest does not list (left by an
    older conversion), and an unfinished conversion's progress file. Files named otherwise are the
    user's own: the converter never touches them, so they are no problem of the split either."""
    listed = {Path(s.path).name for s in split.shards}
    split_dir = root / split.name
    if not split_dir.is_dir():
        return []  # every listed shard is then reported missing by verify_shard
    ours = writer_file_pattern(split.name)
    problems = [
        Problem(str(path), "shard file not listed in the manifest (left by an earlier conversion?)")
        for path in sorted(split_dir.glob(f"{split.name}-*.tar*"))
        if path.name not in listed and ours.fullmatch(path.name)
    ]
    if (split_dir / PROGRESS_NAME).is_file():
        problems.append(
            Problem(str(split_dir / PROGRESS_NAME), "an unfinished conversion: re-run the make_shards command")
        )
    return problems


def verify_shard(task: _ShardTask) -> ShardCheck:
    """Checksum, index file and every sample of one shard."""
    tar = task.root / task.shard.path
    check = ShardCheck()
    try:
        check_shard(task.root, task.shard, check_hash=True)
    except ShardError as error:
        check.problems.append(Problem(str(tar), str(error)))
    if not tar.is_file():
        return check
    index = _read_index_checked(task, check)
    rng = np.random.default_rng([task.seed, task.shard_number])
    try:
        for position, (key, members) in enumerate(_samples(tar)):
            check.num_samples += 1
            expected = index[position] if index is not None and position < len(index) else None
            _check_sample(task, key, members, expected, bool(rng.random() < task.sample_fraction), check)
    except Exception as error:  # a damaged tar can make tarfile raise almost anything; report, go on
        check.problems.append(
            Problem(str(tar), f"unreadable after {check.num_samples} samples ({type(error).__name__}: {error})")
        )
    if check.num_samples != task.shard.num_samples:
        early = (
            " (the tar ends early: damaged header or truncated file)"
            if check.num_samples < task.shard.num_samples
            else ""
        )
        check.problems.append(
            Problem(str(tar), f"holds {check.num_samples} samples, manifest says {task.shard.num_samples}{early}")
        )
    return check


def _read_index_checked(task: _ShardTask, check: ShardCheck) -> list[list[Member]] | None:
    path = task.root / task.shard.index_path
    try:
        index = read_index(path)
    except (OSError, ValueError) as error:
        check.problems.append(Problem(str(path), f"unreadable index file: {error}"))
        return None
    if len(index) != task.shard.num_samples:
        check.problems.append(Problem(str(path), f"lists {len(index)} samples, manifest says {task.shard.num_samples}"))
    return index


def _samples(path: Path):
    """(key, [(member, bytes)]) per sample, in tar order, streaming."""
    key, members = None, []
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isreg():
                continue
            member_key, ext = split_name(info.name)
            if key is not None and member_key != key:
                yield key, members
                members = []
            key = member_key
            handle = tar.extractfile(info)
            data = handle.read() if handle is not None else b""
            if len(data) != info.size:
                raise tarfile.ReadError(f"member {info.name} truncated ({len(data)} of {info.size} bytes)")
            members.append((Member(ext, info.offset_data, info.size, info.name), data))
    if key is not None:
        yield key, members


def _check_sample(
    task: _ShardTask,
    key: str,
    members: list[tuple[Member, bytes]],
    expected: list[Member] | None,
    decode: bool,
    check: ShardCheck,
) -> None:
    where = f"{task.root / task.shard.path} [{key}]"
    located = [m for m, _ in members]
    if expected is not None and located != expected:
        check.problems.append(Problem(where, "tar members do not match the index file (offsets, sizes or names)"))
    by_ext = {m.ext: data for m, data in members}
    if sorted(by_ext) != sorted(fields_for(task.kind)):
        check.problems.append(Problem(where, f"members {sorted(by_ext)}, expected {sorted(fields_for(task.kind))}"))
        return
    where += _source_of(by_ext)
    try:
        sample = decode_sample(key, by_ext)
    except (FormatError, ValueError, IndexError, KeyError) as error:  # UnicodeDecodeError is a ValueError
        check.problems.append(Problem(where, f"malformed sample: {error}"))
        return
    problem = _label_problem(task, sample.label, by_ext)
    if problem:
        check.problems.append(Problem(where, problem))
    if decode:
        check.num_decoded += 1
        problem = _image_problem(by_ext[FIELD_IMAGE])
        if problem:
            check.problems.append(Problem(where, problem))


def _source_of(by_ext: dict[str, bytes]) -> str:
    try:
        return f" (source {json.loads(by_ext[FIELD_META])['source']})"
    except (ValueError, KeyError, TypeError):
        return ""


def _label_problem(task: _ShardTask, label: int, by_ext: dict[str, bytes]) -> str | None:
    low, high = task.kind.label_range(task.num_classes)
    if not low <= label < high:
        return f"label {label} outside [{low}, {high}) ({task.kind.value} split)"
    if FIELD_TARGETS in by_ext and len(by_ext[FIELD_TARGETS]) != task.num_classes * TARGETS_DTYPE.itemsize:
        return f"targets hold {len(by_ext[FIELD_TARGETS])} bytes, expected {task.num_classes}"
    return None


def _image_problem(jpeg: bytes) -> str | None:
    """None when the bytes decode fully as an RGB baseline JPEG."""
    try:
        clean = sanitize(jpeg, _CHECK_ONLY)
    except UnreadableImage as error:
        return f"image {error}"
    return f"image is not RGB baseline JPEG ({clean.repair})" if clean.repair else None


def format_report(report: VerifyReport, max_problems: int = 50) -> str:
    """A human summary: the problems (first ``max_problems``), then counts and time."""
    lines = [str(p) for p in report.problems[:max_problems]]
    if len(report.problems) > max_problems:
        lines.append(f"... and {len(report.problems) - max_problems} more problems")
    status = "OK" if report.ok else f"{len(report.problems)} PROBLEMS"
    lines.append(
        f"{status}: {report.num_samples} samples in {report.num_shards} shards, "
        f"{report.num_decoded} images decoded, {report.seconds:.1f} s"
    )
    return "\n".join(lines)
