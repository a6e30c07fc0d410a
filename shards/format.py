"""The sample format: one definition of what a shard member holds, encoder beside decoder.

A sample is a group of tar members sharing a key (webdataset convention):

- ``KEY.jpg``  RGB baseline JPEG bytes.
- ``KEY.cls``  the dataset's own single label as ASCII digits (``-1`` where a split has none:
  CelebA attributes, unlabelled splits); this is what the plain ``webdataset`` library reads.
- ``KEY.lbl``  the same label as 4 bytes little-endian int32: DALI reads raw bytes with a dtype
  and cannot parse ASCII or JSON, so the label is stored a second time in a fixed binary form.
- ``KEY.tgt``  only in multi-label and attribute splits: ``num_classes`` bytes, one uint8 0/1 per
  class (multi-hot), again fixed-size so DALI can hand it over as a uniform batch.
- ``KEY.json`` metadata: source path, split, and the multi-label set as a list of class indices.

Members are written in the order of ``FIELD_ORDER`` so every sample in a tar looks the same.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FIELD_IMAGE = "jpg"
FIELD_CLASS = "cls"
FIELD_LABEL = "lbl"
FIELD_TARGETS = "tgt"
FIELD_META = "json"

LABEL_DTYPE = np.dtype("<i4")  # KEY.lbl
TARGETS_DTYPE = np.dtype("u1")  # KEY.tgt
NO_LABEL = -1  # KEY.cls / KEY.lbl where the split has no single label

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")


class LabelKind(str, enum.Enum):
    """What supervision a split carries."""

    SINGLE = "single"  # one label per image (ImageNet train, WebVision)
    MULTI = "multi"  # one label plus a multi-label set (ImageNet val + ReaL, digit grid val)
    ATTRIBUTES = "attributes"  # binary attributes only (CelebA); label is NO_LABEL
    # images without ground truth (semi-supervised imitation phases); label is NO_LABEL, no targets.
    # The split still records the dataset's class names: the classes the teacher's pseudo-labels index.
    UNLABELLED = "unlabelled"

    @property
    def has_targets(self) -> bool:
        return self in (LabelKind.MULTI, LabelKind.ATTRIBUTES)

    def label_range(self, num_classes: int) -> tuple[int, int]:
        """[low, high) of the values ``KEY.lbl`` may hold in a split of this kind."""
        if self is LabelKind.UNLABELLED:
            return NO_LABEL, NO_LABEL + 1
        if self is LabelKind.ATTRIBUTES:
            return NO_LABEL, num_classes  # the label is unused; historically any class or NO_LABEL
        return 0, num_classes


def fields_for(kind: LabelKind) -> tuple[str, ...]:
    """Tar member extensions of every sample in a split of this kind, in write order."""
    base = (FIELD_IMAGE, FIELD_CLASS, FIELD_LABEL)
    return base + ((FIELD_TARGETS,) if kind.has_targets else ()) + (FIELD_META,)


class FormatError(ValueError):
    """A sample that does not follow the shard format."""


def check_key(key: str) -> str:
    """Keys become tar member stems, so they must be unique and free of dots and slashes."""
    if not _KEY_PATTERN.fullmatch(key):  # fullmatch: '$' alone would accept a trailing newline
        raise FormatError(f"invalid sample key {key!r}: use letters, digits, '_' or '-' only")
    return key


def check_split_name(name: str, what: str = "split name") -> str:
    """A split's name is its folder under the dataset root: a plain name, never a path or ``..``."""
    if not _KEY_PATTERN.fullmatch(name):
        raise FormatError(
            f"invalid {what} {name!r}: not a plain folder name (use letters, digits, '_' or '-'; "
            "it names the split's folder)"
        )
    return name


def safe_key(text: str) -> str:
    """Turn a source path or name into a valid key (dots and separators become '_')."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text)


@dataclass(frozen=True)
class Sample:
    """One decoded sample: ``label`` the single given label, ``label_set`` the multi-label set (class
    indices; the ``targets`` of a batch are its multi-hot form) or None."""

    key: str
    jpeg: bytes
    label: int
    label_set: tuple[int, ...] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


def encode_sample(sample: Sample, kind: LabelKind, num_classes: int) -> list[tuple[str, bytes]]:
    """Tar members (name, bytes) for one sample, in ``fields_for(kind)`` order."""
    check_key(sample.key)
    low, high = kind.label_range(num_classes)
    if not low <= sample.label < high:
        raise FormatError(f"sample {sample.key}: label {sample.label} outside [{low}, {high}) ({kind.value} split)")
    meta = dict(sample.meta)
    members = {
        FIELD_IMAGE: sample.jpeg,
        FIELD_CLASS: str(sample.label).encode("ascii"),
        FIELD_LABEL: np.array([sample.label], dtype=LABEL_DTYPE).tobytes(),
    }
    if kind.has_targets:
        label_set = sorted(set(sample.label_set or ()))
        if any(not 0 <= c < num_classes for c in label_set):
            raise FormatError(f"sample {sample.key}: multi-label set {label_set} outside [0, {num_classes})")
        members[FIELD_TARGETS] = multi_hot(label_set, num_classes).tobytes()
        meta["label_set"] = label_set
    members[FIELD_META] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return [(f"{sample.key}.{ext}", members[ext]) for ext in fields_for(kind)]


def decode_sample(key: str, members: Mapping[str, bytes]) -> Sample:
    """Inverse of ``encode_sample``; ``members`` maps extension to bytes."""
    missing = [ext for ext in (FIELD_IMAGE, FIELD_CLASS, FIELD_LABEL, FIELD_META) if ext not in members]
    if missing:
        raise FormatError(f"sample {key}: missing members {missing}")
    label = int(members[FIELD_CLASS].decode("ascii"))
    binary_label = int(np.frombuffer(members[FIELD_LABEL], dtype=LABEL_DTYPE)[0])
    if label != binary_label:
        raise FormatError(f"sample {key}: .cls says {label} but .lbl says {binary_label}")
    meta = json.loads(members[FIELD_META].decode("utf-8"))
    label_set = None
    if FIELD_TARGETS in members:
        label_set = tuple(int(c) for c in np.flatnonzero(np.frombuffer(members[FIELD_TARGETS], TARGETS_DTYPE)))
    return Sample(key=key, jpeg=members[FIELD_IMAGE], label=label, label_set=label_set, meta=meta)


def multi_hot(labels: list[int] | tuple[int, ...], num_classes: int) -> np.ndarray:
    """uint8 0/1 vector of length ``num_classes`` with ones at ``labels``."""
    out = np.zeros(num_classes, dtype=TARGETS_DTYPE)
    out[list(labels)] = 1
    return out
