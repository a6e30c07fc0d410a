"""Writing a split: shuffle sources, sanitise images in parallel, roll tar shards, record the manifest.

The one entry point is ``write_split``. It is resumable: after every finished shard a progress
file records the shards so far; re-running the same conversion keeps every recorded shard whose
checksum still matches and writes only the rest, ending with the same manifest as an
uninterrupted run (inputs are shuffled with a fixed seed and tar headers are deterministic).
The whole write holds the output folder's lock (``shards.folder_lock``), and it deletes only files
named as the writer names them: a user's own files in a split folder are left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shards.atomic_files import atomic_write_text, temp_sibling
from shards.folder_lock import output_lock
from shards.format import LabelKind, Sample, check_key, check_split_name, encode_sample
from shards.images import ImagePolicy, UnreadableImage, encode_array, sanitize
from shards.manifest import (
    MANIFEST_NAME,
    FileReport,
    ShardError,
    ShardRecord,
    SplitManifest,
    check_shard,
    load_splits,
    remove_split,
    save_split,
    sha256_file,
)
from shards.parallel import ordered_map
from shards.progress import Progress
from shards.tar_io import TarShardFile, format_index

PROGRESS_NAME = ".progress.json"
_SHARD_DIGITS = 6


def shard_file_name(split: str, number: int, suffix: str) -> str:
    """``SPLIT-NNNNNN.tar`` / ``.idx``: the one definition of how the writer names shard files."""
    return f"{split}-{number:0{_SHARD_DIGITS}d}{suffix}"


def writer_file_pattern(split: str) -> re.Pattern[str]:
    """Names the writer creates in a split folder: shards, index files, and their temporary files
    (``.NAME.PID-RANDOM.partial`` / ``.tmp``, and the fixed ``NAME.partial`` of older versions)."""
    stem = rf"{re.escape(split)}-\d{{{_SHARD_DIGITS},}}\.(?:tar|idx)"
    return re.compile(rf"{stem}|{stem}\.partial|\.{stem}\.\d+-[0-9a-f]+\.(?:partial|tmp)|\.{stem}\.tmp")


# Temporary files of an atomic write (``manifest.temp_sibling``) of the manifest or of a split's
# progress file, left behind by a process killed mid-write.
_MANIFEST_TMP = re.compile(rf"\.{re.escape(MANIFEST_NAME)}\.\d+-[0-9a-f]+\.tmp")
_PROGRESS_TMP = re.compile(rf"\.{re.escape(PROGRESS_NAME)}\.\d+-[0-9a-f]+\.tmp")


def _remove_stale_temporaries(root: Path, split_dir: Path) -> None:
    """Every manifest and progress write holds the folder's lock, as this caller does: such a
    temporary file on disk now belongs to a process that died, never to a live writer."""
    for folder, pattern in ((root, _MANIFEST_TMP), (split_dir, _PROGRESS_TMP)):
        for path in folder.iterdir():
            if pattern.fullmatch(path.name) and path.is_file():
                path.unlink()


@dataclass(frozen=True, slots=True)  # slots: ~1.3M of these are listed for ImageNet train
class SourceItem:
    """One input sample: an image file (``path``) or raw pixels (``pixels``), with its labels."""

    key: str
    label: int
    source: str
    path: str | None = None
    pixels: np.ndarray | None = field(default=None, compare=False)
    label_set: tuple[int, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    skip: str | None = None  # a reason known before reading (e.g. a file name that is not UTF-8)

    def fingerprint(self) -> str:
        base = f"{self.key}|{self.source}|{self.label}|{self.label_set}"
        return base if self.skip is None else f"{base}|skip:{self.skip}"


@dataclass(frozen=True)
class SplitSpec:
    """What a split is: its name, label kind and classes, plus source-specific facts for the manifest."""

    name: str
    label_kind: LabelKind
    class_names: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_split_name(self.name)
        if not self.class_names:
            raise ValueError(f"split {self.name}: no classes")


@dataclass(frozen=True)
class WriterSettings:
    """How shards are cut and images stored."""

    max_samples_per_shard: int = 1000
    max_bytes_per_shard: int = 512 * 1024 * 1024
    seed: int = 0
    workers: int = 1
    image: ImagePolicy = ImagePolicy()
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got {self.max_samples_per_shard}")
        if self.max_bytes_per_shard < 1024:
            raise ValueError(f"max_bytes_per_shard must be >= 1024, got {self.max_bytes_per_shard}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    def recorded(self) -> dict[str, Any]:
        """The settings that shape the shards (not workers or progress: they change nothing)."""
        out = asdict(self)
        for transient in ("workers", "progress"):
            out.pop(transient)
        return out


@dataclass(frozen=True)
class Prepared:
    """A sample ready for the tar, or the reason it was skipped."""

    members: list[tuple[str, bytes]] | None
    source: str
    repair: str | None = None
    skip: str | None = None


def prepare(item: SourceItem, spec: SplitSpec, policy: ImagePolicy) -> Prepared:
    """Read, sanitise and encode one item (runs in worker processes)."""
    if item.skip is not None:
        return Prepared(None, item.source, skip=item.skip)
    try:
        if item.pixels is not None:
            jpeg, repair = encode_array(item.pixels, policy.quality), None
        else:
            clean = sanitize(_read_file(item.path), policy)
            jpeg, repair = clean.jpeg, clean.repair
    except UnreadableImage as error:
        return Prepared(None, item.source, skip=str(error))
    meta = {"source": item.source, "split": spec.name, **item.meta}
    sample = Sample(key=item.key, jpeg=jpeg, label=item.label, label_set=item.label_set, meta=meta)
    members = encode_sample(sample, spec.label_kind, len(spec.class_names))
    return Prepared(members, item.source, repair=repair)


def _read_file(path: str | None) -> bytes:
    if path is None:
        raise UnreadableImage("no path and no pixels")
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UnreadableImage(f"unreadable ({type(error).__name__}: {error.strerror or error})") from None


class _PrepareWith:
    """Picklable ``prepare`` bound to a spec and policy, for worker processes."""

    def __init__(self, spec: SplitSpec, policy: ImagePolicy) -> None:
        self.spec, self.policy = spec, policy

    def __call__(self, item: SourceItem) -> Prepared:
        return prepare(item, self.spec, self.policy)


@dataclass
class _Progress:
    """Shards finished so far, with how many inputs they consumed and the file reports."""

    fingerprint: str
    shards: list[dict[str, Any]] = field(default_factory=list)

    @property
    def inputs_done(self) -> int:
        return self.shards[-1]["inputs_end"] if self.shards else 0


def write_split(root: Path, spec: SplitSpec, items: list[SourceItem], settings: WriterSettings) -> SplitManifest:
    """Write (or resume, or keep) split ``spec.name`` in ``root``, holding the folder's lock throughout."""
    with output_lock(root):
        return _write_split_locked(Path(root), spec, items, settings)


def _write_split_locked(
    root: Path, spec: SplitSpec, items: list[SourceItem], settings: WriterSettings
) -> SplitManifest:
    """Write ``items`` as shards of split ``spec.name`` under ``root`` and record it in the manifest."""
    root = Path(root)
    split_dir = root / spec.name
    split_dir.mkdir(parents=True, exist_ok=True)
    _check_unique_keys(items)
    order = np.random.default_rng(settings.seed).permutation(len(items))
    ordered = [items[i] for i in order]  # write-time shuffle: DALI only shuffles inside a buffer
    fingerprint = _fingerprint(spec, ordered, settings)
    _remove_stale_temporaries(root, split_dir)
    done = _completed_split(root, spec.name, fingerprint)
    if done is not None:
        print(f"split {spec.name}: already complete in {root} ({done.num_samples} samples), nothing to do")
        return done
    # The old entry would list shards about to be deleted or replaced: drop it before touching them.
    remove_split(root, spec.name)
    progress = _resume_progress(split_dir, fingerprint, root)
    _remove_unlisted_shards(split_dir, spec.name, progress)
    _write_remaining(root, split_dir, spec, ordered, settings, progress)
    manifest = _finish(root, spec, settings, progress, len(items))
    (split_dir / PROGRESS_NAME).unlink(missing_ok=True)
    _print_summary(manifest)
    return manifest


def _write_remaining(
    root: Path,
    split_dir: Path,
    spec: SplitSpec,
    ordered: list[SourceItem],
    settings: WriterSettings,
    progress: _Progress,
) -> None:
    start = progress.inputs_done
    prepared = ordered_map(_PrepareWith(spec, settings.image), ordered[start:], settings.workers)
    bar = Progress(len(ordered), spec.name, "img", initial=start, enabled=settings.progress)
    shard = _ShardInProgress(root, split_dir, spec.name, len(progress.shards))
    try:
        for consumed, result in enumerate(prepared, start=start + 1):
            if result.members is not None and shard.is_full(result.members, settings):
                _record_shard(split_dir, progress, shard.close(), consumed - 1)
                shard = _ShardInProgress(root, split_dir, spec.name, len(progress.shards))
            shard.add(result)
            bar.update(1)
        bar.close()
        if shard.has_content:
            _record_shard(split_dir, progress, shard.close(), len(ordered))
    except BaseException:
        shard.discard()  # frees the space a full disk needs; finished shards stay for the resume
        raise


class _ShardInProgress:
    """One tar being filled; written as ``.partial`` and renamed only when complete."""

    def __init__(self, root: Path, split_dir: Path, split: str, index: int) -> None:
        self.root = root
        self.final = split_dir / shard_file_name(split, index, ".tar")
        self.tar: TarShardFile | None = None
        self.skipped: list[FileReport] = []
        self.repaired: list[FileReport] = []

    @property
    def has_content(self) -> bool:
        return self.tar is not None or bool(self.skipped)

    def is_full(self, members: list[tuple[str, bytes]], settings: WriterSettings) -> bool:
        if self.tar is None:
            return False
        return (
            len(self.tar.samples) >= settings.max_samples_per_shard
            or self.tar.size_with(members) > settings.max_bytes_per_shard
        )

    def add(self, result: Prepared) -> None:
        if result.members is None:
            self.skipped.append(FileReport(result.source, result.skip or "skipped"))
            return
        if self.tar is None:
            self.tar = TarShardFile(temp_sibling(self.final, ".partial"))
        self.tar.add_sample(result.members)
        if result.repair:
            self.repaired.append(FileReport(result.source, f"re-encoded to RGB baseline JPEG: {result.repair}"))

    def close(self) -> dict[str, Any]:
        """Finish the tar (index first, then rename) and describe it; skips-only shards have no tar."""
        record: dict[str, Any] = {"shard": None}
        if self.tar is not None:
            self.tar.close()
            index = self.final.with_suffix(".idx")
            atomic_write_text(index, format_index(self.tar.samples))
            os.replace(self.tar.path, self.final)
            record["shard"] = asdict(
                ShardRecord(
                    path=str(self.final.relative_to(self.root)),
                    index_path=str(index.relative_to(self.root)),
                    num_samples=len(self.tar.samples),
                    num_bytes=self.final.stat().st_size,
                    sha256=sha256_file(self.final),
                )
            )
        record["skipped"] = [asdict(r) for r in self.skipped]
        record["repaired"] = [asdict(r) for r in self.repaired]
        return record

    def discard(self) -> None:
        """Drop the unfinished tar (after an error or an interruption)."""
        if self.tar is not None:
            self.tar.discard()


def _record_shard(split_dir: Path, progress: _Progress, record: dict[str, Any], inputs_end: int) -> None:
    record["inputs_end"] = inputs_end
    progress.shards.append(record)
    atomic_write_text(split_dir / PROGRESS_NAME, json.dumps(asdict(progress)))


def _finish(
    root: Path, spec: SplitSpec, settings: WriterSettings, progress: _Progress, num_inputs: int
) -> SplitManifest:
    shards = [ShardRecord(**r["shard"]) for r in progress.shards if r["shard"] is not None]
    skipped = [FileReport(**s) for r in progress.shards for s in r["skipped"]]
    repaired = [FileReport(**s) for r in progress.shards for s in r["repaired"]]
    if not shards:
        reasons = Counter(s.reason for s in skipped).most_common(3)
        raise ShardError(
            f"split {spec.name}: no sample could be written; all {num_inputs} inputs were skipped ({reasons})"
        )
    manifest = SplitManifest(
        name=spec.name,
        num_samples=sum(s.num_samples for s in shards),
        num_classes=len(spec.class_names),
        class_names=list(spec.class_names),
        label_kind=spec.label_kind,
        shards=shards,
        writer={**settings.recorded(), "num_inputs": num_inputs, "fingerprint": progress.fingerprint},
        skipped=skipped,
        repaired=repaired,
        extra=dict(spec.extra),
    )
    save_split(root, manifest)
    return manifest


def _fingerprint(spec: SplitSpec, ordered: list[SourceItem], settings: WriterSettings) -> str:
    digest = hashlib.sha256()
    # spec.extra holds source settings that change pixels but not keys (e.g. the grid's cell size)
    head = [spec.name, spec.label_kind.value, spec.class_names, spec.extra, settings.recorded()]
    digest.update(json.dumps(head, default=str, sort_keys=True).encode())
    for item in ordered:
        digest.update(item.fingerprint().encode())
    return digest.hexdigest()


def _completed_split(root: Path, split: str, fingerprint: str) -> SplitManifest | None:
    """The existing manifest entry when it was written by the same conversion and is intact."""
    try:
        existing = load_splits(root).get(split)
    except ShardError:
        return None
    if existing is None or existing.writer.get("fingerprint") != fingerprint:
        return None
    try:
        for shard in existing.shards:
            check_shard(root, shard)
    except ShardError:
        return None
    return existing


def _resume_progress(split_dir: Path, fingerprint: str, root: Path) -> _Progress:
    """Keep the longest prefix of recorded shards that are still intact on disk."""
    path = split_dir / PROGRESS_NAME
    fresh = _Progress(fingerprint)
    if not path.is_file():
        return fresh
    try:
        recorded = _Progress(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return fresh
    if recorded.fingerprint != fingerprint:
        return fresh
    kept = _Progress(fingerprint)
    for record in recorded.shards:
        if record["shard"] is not None:
            try:
                check_shard(root, ShardRecord(**record["shard"]))
            except ShardError:
                break
        kept.shards.append(record)
    if kept.shards:
        print(f"resuming split {split_dir.name}: {len(kept.shards)} shards kept, {kept.inputs_done} inputs done")
    return kept


def _remove_unlisted_shards(split_dir: Path, split: str, progress: _Progress) -> None:
    """Delete files the writer made for this split that the progress does not keep (stale shards,
    partial tars, temporary files); files named otherwise (a user's own) are never touched."""
    keep = {Path(r["shard"]["path"]).name for r in progress.shards if r["shard"] is not None}
    keep |= {Path(name).with_suffix(".idx").name for name in keep}
    own = writer_file_pattern(split)
    for path in split_dir.iterdir():
        if path.name not in keep and own.fullmatch(path.name) and path.is_file():
            path.unlink()


def first_class_difference(ours: list[str], theirs: list[str], our_name: str, their_name: str) -> str | None:
    """None when two class lists are equal, else where they first differ, in words."""
    if ours == theirs:
        return None
    for index, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return f"class {index} is {a!r} in {our_name}, {b!r} in {their_name}"
    common = min(len(ours), len(theirs))
    return f"{len(ours)} classes in {our_name}, {len(theirs)} in {their_name}, the first {common} alike"


def make_room(root: Path, specs: list[SplitSpec], overwrite: bool) -> None:
    """Refuse to put ``specs`` beside splits of another dataset in ``root``: every split a manifest
    lists must have the same classes (docs/DATASETS.md, "Mixing datasets"). With ``overwrite`` the
    other dataset's splits are removed instead (their manifest entries and the files the writer made).
    Call it holding the folder's lock; splits named in ``specs`` are being replaced and do not count."""
    if not Path(root, MANIFEST_NAME).is_file():
        return
    replaced = {spec.name for spec in specs}
    for name, split in load_splits(root).items():
        if name in replaced:
            continue
        differences = (
            first_class_difference(s.class_names, split.class_names, f"the new split {s.name!r}", f"split {name!r}")
            for s in specs
        )
        difference = next(filter(None, differences), None)
        if difference is None:
            continue
        if not overwrite:
            raise ShardError(
                f"{Path(root, MANIFEST_NAME)} holds split {name!r} of another dataset ({difference}); "
                f"convert into another --out, or pass --overwrite to remove split {name!r} first"
            )
        print(f"--overwrite: removing split {name} of another dataset from {root} ({difference})")
        remove_split(root, name)
        _remove_split_files(Path(root) / name, name)


def _remove_split_files(split_dir: Path, split: str) -> None:
    """The files the writer made in ``split_dir`` (a user's own files stay), then the folder if empty."""
    if not split_dir.is_dir():
        return
    own = writer_file_pattern(split)
    for path in split_dir.iterdir():
        ours = own.fullmatch(path.name) or path.name == PROGRESS_NAME or _PROGRESS_TMP.fullmatch(path.name)
        if ours and path.is_file():
            path.unlink()
    if not any(split_dir.iterdir()):
        split_dir.rmdir()


def _check_unique_keys(items: list[SourceItem]) -> None:
    counts = Counter(item.key for item in items)
    duplicates = [key for key, n in counts.items() if n > 1]
    if duplicates:
        raise ShardError(f"duplicate sample keys, e.g. {duplicates[:3]}: keys must be unique within a split")
    for item in items:
        check_key(item.key)


def _print_summary(manifest: SplitManifest) -> None:
    print(
        f"split {manifest.name}: {manifest.num_samples} samples in {len(manifest.shards)} shards; "
        f"{len(manifest.repaired)} repaired, {len(manifest.skipped)} skipped"
    )
    for kind, reports in (("repaired", manifest.repaired), ("skipped", manifest.skipped)):
        for reason, count in Counter(r.reason for r in reports).most_common():
            print(f"  {kind} {count:>6}  {reason}")
