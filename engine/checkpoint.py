"""Checkpoints: the collection of every stateful component's ``state_dict``, written atomically,
read back with ``torch.load(weights_only=True)`` and checked against a digest of its contents.

File layout (``CHECKPOINT_FORMAT`` 2; docs/DESIGN.md, "Checkpoints")::

    {"format": 2, "config": {...plain run config...}, "components": {name: state_dict},
     "classes": {"class_names": [...], "class_names_sha256": hex, "label_kind": str}, "digest": hex}

``classes`` (``engine.run_folder.ClassRecord``) is what the model's outputs mean: export takes the
class names from it (no data needed) and resume refuses data with other classes. Checkpoints written
before it existed have none; the digest covers it when present, so they still read.

Only tensors, numbers, strings, lists and dicts are stored, so loading never runs code. The digest
(BLAKE2b over every tensor's bytes and every value, in a fixed order) catches flipped bytes that
still unpickle; truncated and empty files fail to unpickle; both give an error naming the file.
The write goes to a unique temporary sibling, is fsynced and renamed, so a crash mid-write leaves
the previous checkpoint whole.

``CheckpointWriter`` is how the trainer writes: the state is copied to host memory at the checkpoint
point (quick), then hashed, written, fsynced and renamed by a background thread while training goes
on; the next checkpoint, and the end of the run, wait for the previous write. Besides ``last.pt`` it
keeps the last N checkpoints as ``step-XXXXXXX.pt`` and the best one as ``best.pt`` (hard links to
one written file where the file system has them, so a checkpoint is written once).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from shards.atomic_files import temp_sibling

if TYPE_CHECKING:
    from engine.config import RunConfig

CHECKPOINT_FORMAT = 2
STEP_FILE = re.compile(r"^step-(\d{7,})\.pt$")
LAST_NAME, BEST_NAME = "last.pt", "best.pt"  # in a run folder's checkpoints/ (``RunFolder.checkpoints_dir``)


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Progress:
    """How far training got: the next optimizer step, the next batch to read (epoch, index of the
    global batch in the epoch: the same samples on any number of processes with the torch backend),
    the same for the unlabelled split of a semi-supervised run (its own position: each stream
    advances only on the steps that read it), and the best value of ``checkpoint.best_metric`` so far
    (None before the first evaluation)."""

    def __init__(self) -> None:
        self.step, self.epoch, self.batch = 0, 0, 0
        self.unlabelled_epoch, self.unlabelled_batch = 0, 0
        self.best_value: float | None = None
        self.best_step = -1

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "unlabelled_epoch": self.unlabelled_epoch,
            "unlabelled_batch": self.unlabelled_batch,
            "best_value": self.best_value,
            "best_step": self.best_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.batch = int(state["step"]), int(state["epoch"]), int(state["batch"])
        # absent from checkpoints written before semi-supervised runs existed: the stream's start
        self.unlabelled_epoch, self.unlabelled_batch = (
            int(state.get("unlabelled_epoch", 0)),
            int(state.get("unlabelled_batch", 0)),
        )
        # absent from checkpoints written before best.pt existed: no best yet
        self.best_value, self.best_step = state.get("best_value"), int(state.get("best_step", -1))


class RngState:
    """Python, NumPy, torch (and CUDA) random generators, as tensors and plain values."""

    def state_dict(self) -> dict[str, Any]:
        legacy = np.random.get_state()
        assert isinstance(legacy, tuple)  # legacy=True (the default) gives the tuple form
        name, keys, pos, has_gauss, cached = legacy
        state = {
            "python": random.getstate(),
            "numpy": {
                "name": name,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached": float(cached),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        numpy = state["numpy"]
        np.random.set_state(
            (numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached"])
        )
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _feed(hasher: hashlib.blake2b, value: Any) -> None:
    """Hash a state tree: structure, keys, values and tensor bytes, in a fixed order."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        hasher.update(f"T{flat.dtype}{tuple(value.shape)}".encode())
        hasher.update(flat.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        hasher.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            _feed(hasher, key)
            _feed(hasher, value[key])
    elif isinstance(value, (list, tuple)):
        hasher.update(f"L{len(value)}".encode())
        for item in value:
            _feed(hasher, item)
    else:
        hasher.update(f"V{type(value).__name__}:{value!r}".encode())


def digest(tree: Any) -> str:
    hasher = hashlib.blake2b(digest_size=32)
    _feed(hasher, tree)
    return hasher.hexdigest()


def host_copy(tree: Any) -> Any:
    """``tree`` with every tensor copied to host memory (device tensors without waiting one by one:
    the caller synchronises once, ``host_snapshot`` does); plain values are immutable or rebuilt."""
    if isinstance(tree, torch.Tensor):
        tensor = tree.detach()
        return tensor.clone() if tensor.device.type == "cpu" else tensor.to("cpu", non_blocking=True)
    if isinstance(tree, dict):
        return {key: host_copy(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(host_copy(value) for value in tree)
    return tree


def host_snapshot(
    components: dict[str, Stateful], config: dict[str, Any], classes: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Every component's state, copied to host memory now: training may go on changing the originals."""
    states = host_copy({name: component.state_dict() for name, component in components.items()})
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # SYNC: checkpoint point; the non-blocking copies have landed
    payload = {"format": CHECKPOINT_FORMAT, "config": config, "components": states}
    return payload if classes is None else {**payload, "classes": classes}


def _digested(payload: dict[str, Any]) -> dict[str, Any]:
    """The parts of a payload its digest covers (``classes`` only where present: older checkpoints)."""
    parts = {"config": payload["config"], "components": payload["components"]}
    return parts if "classes" not in payload else {**parts, "classes": payload["classes"]}


def write_payload(payload: dict[str, Any], paths: list[Path]) -> None:
    """Add the digest, write once to a temporary file, fsync, and publish it under every path of
    ``paths`` in order, each atomically: a crash leaves every path either its old or its new file."""
    payload = {**payload, "digest": digest(_digested(payload))}
    folder = paths[0].parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(paths[0], ".tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        for path in paths[:-1]:
            _publish_copy(tmp, path)
        os.replace(tmp, paths[-1])
        _fsync_folder(folder)
    finally:
        tmp.unlink(missing_ok=True)


def _publish_copy(source: Path, path: Path) -> None:
    """``path`` becomes a second name of ``source`` (a hard link; a copy where links are refused)."""
    tmp = temp_sibling(path, ".tmp")
    try:
        try:
            os.link(source, tmp)
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK, errno.EOPNOTSUPP):
                raise
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable (a power cut could otherwise lose them)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(handle)


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files of writes that a killed process left behind; the list removed."""
    stale = sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@dataclass(frozen=True)
class CheckpointTargets:
    """Where one checkpoint goes: ``last.pt`` (with ``step-XXXXXXX.pt`` when the last N are kept),
    ``best.pt``, or both."""

    step: int
    last: bool = True
    best: bool = False


class CheckpointWriter:
    """Writes checkpoints into ``folder`` on a background thread, one at a time (module docstring)."""

    def __init__(self, folder: Path, keep_last: int = 0, classes: dict[str, Any] | None = None) -> None:
        self.folder, self.keep_last = Path(folder), keep_last
        self.classes = classes  # the run's class record, written into every checkpoint
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def last_path(self) -> Path:
        return self.folder / LAST_NAME

    @property
    def best_path(self) -> Path:
        return self.folder / BEST_NAME

    def step_path(self, step: int) -> Path:
        return self.folder / f"step-{step:07d}.pt"

    def save(self, components: dict[str, Stateful], config: dict[str, Any], targets: CheckpointTargets) -> None:
        """Copy the state to host memory now; write it in the background. Raises the error of the
        previous write, if it failed (its files were left as they were before it)."""
        self.wait()
        payload = host_snapshot(components, config, self.classes)
        self._thread = threading.Thread(target=self._write, args=(payload, targets), name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        """Until the write in flight is on disk; its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _write(self, payload: dict[str, Any], targets: CheckpointTargets) -> None:
        try:
            write_payload(payload, self.paths(targets))
            if targets.last and self.keep_last:
                self._prune()
        except BaseException as error:  # reported to the training thread by wait()
            self._error = error

    def paths(self, targets: CheckpointTargets) -> list[Path]:
        """In publishing order: a killed write leaves last.pt at an older, whole checkpoint."""
        paths = []
        if targets.last:
            paths += ([self.step_path(targets.step)] if self.keep_last else []) + [self.last_path]
        if targets.best:
            paths.append(self.best_path)
        return paths

    def step_files(self) -> list[Path]:
        """The kept ``step-XXXXXXX.pt`` files, oldest first."""
        if not self.folder.is_dir():
            return []
        steps = {path: int(m[1]) for path in self.folder.iterdir() if (m := STEP_FILE.match(path.name))}
        return sorted(steps, key=steps.__getitem__)

    def _prune(self) -> None:
        for path in self.step_files()[: -self.keep_last]:
            path.unlink(missing_ok=True)


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The checked payload of ``path``; a CheckpointError naming the file when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: nothing to resume")
    advice = "it is damaged (truncated or altered); restore it from a copy, or start the run afresh in a new --out"
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): {advice}")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # unpickling and zip errors come in many types; all mean the same here
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}): {advice}") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"{path} is not a checkpoint of this trainer (no format field)")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {payload['format']}; this release reads format {CHECKPOINT_FORMAT} only. "
            f"Finish that run with the release that wrote it, or start afresh"
        )
    if digest(_digested(payload)) != payload.get("digest"):
        raise CheckpointError(f"checkpoint {path} fails its digest check: {advice}")
    return payload


def load_components(payload: dict[str, Any], components: dict[str, Stateful], path: Path) -> None:
    """Load each component from a checked payload; missing or unexpected parts name the file."""
    stored = payload["components"]
    missing, unexpected = sorted(set(components) - set(stored)), sorted(set(stored) - set(components))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit this run: missing {missing}, unexpected {unexpected}")
    for name, component in components.items():
        component.load_state_dict(stored[name])


def recorded_config_changes(payload: dict[str, Any], config: RunConfig, path: Path) -> tuple[list[str], list[str]]:
    """How ``config`` differs from the config checkpoint ``path`` recorded when it was written, as
    ``key (flags): old -> new`` lines: (changes of keys that are not resume-safe, resume-safe changes)."""
    from engine.config import ConfigError, build_config, changed_keys

    try:
        recorded = build_config(payload["config"], {}, source=f"checkpoint {path} (its recorded config)")
    except ConfigError as error:
        raise CheckpointError(str(error)) from None
    unsafe: list[str] = []
    safe: list[str] = []
    for key, old, new in changed_keys(recorded, config):
        (safe if key.resume_safe else unsafe).append(f"{key.label()}: {old!r} -> {new!r}")
    return unsafe, safe


def check_resumed_config(payload: dict[str, Any], config: RunConfig, path: Path) -> list[str]:
    """Compare the config a resumed run is about to use (its ``config.toml``, possibly edited by hand,
    plus flags) with the one ``path`` recorded: a change of a key that is not resume-safe, or fewer
    steps than the checkpoint has taken, is a CheckpointError naming the key; the resume-safe
    changes are returned for the log."""
    unsafe, safe = recorded_config_changes(payload, config, path)
    if unsafe:
        raise CheckpointError(
            f"config.toml or flags change what checkpoint {path} trained: {'; '.join(unsafe)}. Undo the change "
            f"(a run's config.toml is its record, not a place to edit), or start a new run in another --out"
        )
    step = int(payload["components"].get("progress", {}).get("step", 0))
    if config.num_steps < step:
        raise CheckpointError(
            f"num_steps (--steps) {config.num_steps} is below the {step} steps checkpoint {path} has already taken; "
            f"give --steps {step} or more (or export the finished run as it is)"
        )
    return safe
