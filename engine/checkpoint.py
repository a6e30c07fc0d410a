"""Checkpoints: the collection of every stateful component's ``state_dict``, written atomically,
read back with ``torch.load(weights_only=True)`` and checked against a digest of its contents.

File layout (``CHECKPOINT_FORMAT`` 2; docs/DESIGN.md, "Checkpoints")::

    {"format": 2, "config": {...plain run config...}, "components": {name: state_dict}, "digest": hex}

Only tensors, numbers, strings, lists and dicts are stored, so loading never runs code. The digest
(BLAKE2b over every tensor's bytes and every value, in a fixed order) catches flipped bytes that
still unpickle; truncated and empty files fail to unpickle; both give an error naming the file.
The write goes to a unique temporary sibling, is fsynced and renamed, so a crash mid-write leaves
the previous checkpoint whole.
"""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

CHECKPOINT_FORMAT = 2


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Progress:
    """How far training got: the next optimizer step, and the next batch to read (epoch, index)."""

    def __init__(self) -> None:
        self.step, self.epoch, self.batch = 0, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.batch = int(state["step"]), int(state["epoch"]), int(state["batch"])


class RngState:
    """Python, NumPy, torch (and CUDA) random generators, as tensors and plain values."""

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        numpy = state["numpy"]
        np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _feed(hasher: "hashlib._Hash", value: Any) -> None:
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


def save_checkpoint(path: Path, components: dict[str, Stateful], config: dict[str, Any]) -> None:
    """Collect every component's state and write it atomically: unique temporary sibling, fsync, rename."""
    states = {name: component.state_dict() for name, component in components.items()}
    payload = {"format": CHECKPOINT_FORMAT, "config": config, "components": states}
    payload["digest"] = digest({"config": config, "components": states})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    if digest({"config": payload["config"], "components": payload["components"]}) != payload.get("digest"):
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
