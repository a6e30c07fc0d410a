"""Input pipelines: shards -> normalised channels-last device batches (DALI, or torch where DALI is absent).

``build_loader`` is the one entry point. DALI is imported only when a DALI loader is built, so
this package imports and works without it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipelines.contract import AugmentConfig, Batch, Loader, LoaderConfig, ShardDataError, rank_range
from shards.manifest import SplitManifest, check_shards, load_split

__all__ = [
    "AugmentConfig", "Batch", "Loader", "LoaderConfig", "ShardDataError", "build_loader", "dali_import_error",
    "describe_backend", "rank_range", "resolve_backend",
]  # fmt: skip


log = logging.getLogger(__name__)
_warned_fallback: set[str] = set()  # reasons already warned about: one line per process each


def dali_import_error() -> str | None:
    """None when the DALI backend imports here (NVIDIA DALI, its PyTorch plugin and
    ``pipelines.dali_backend``), else why it does not. Any failure counts, not only ImportError and
    OSError: a DALI built for another CUDA, or one that finds no driver, raises what it likes."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401

        import pipelines.dali_backend  # noqa: F401
    except Exception as error:
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return None


def resolve_backend(requested: str) -> str:
    """The backend to build: "auto" means "dali" when DALI is importable, else "torch" (with a
    one-line warning saying why, once per reason); asking for "dali" where it is not importable
    is an error that says why and what to do."""
    if requested == "torch":
        return "torch"
    reason = dali_import_error()
    if reason is None:
        return "dali"
    if requested == "auto":
        if reason not in _warned_fallback:
            _warned_fallback.add(reason)
            log.warning("data.backend auto: NVIDIA DALI does not import (%s); using the torch loader", reason)
        return "torch"
    raise RuntimeError(
        f"backend 'dali' was asked for but NVIDIA DALI cannot be imported ({reason}). Install the extra "
        "matching torch's CUDA (README, 'Install'): `pip install -e '.[dali-cuda12]'` or `'.[dali-cuda13]'` "
        "(Linux x86-64 only), or use backend 'torch' (or 'auto')."
    )


def describe_backend(requested: str) -> str:
    """The backend ``resolve_backend`` picks, and why, for the log:
    "torch (auto: NVIDIA DALI cannot be imported here: ...)"."""
    chosen = resolve_backend(requested)
    if requested != "auto":
        return f"{chosen} (asked for)"
    if chosen == "dali":
        return "dali (auto: NVIDIA DALI imports here)"
    return f"torch (auto: NVIDIA DALI cannot be imported here: {dali_import_error()})"


def build_loader(root: Path, split: str, config: LoaderConfig, manifest: SplitManifest | None = None) -> Loader:
    """A loader over split ``split`` of the shard folder ``root``, validated against its manifest
    (``manifest`` when the caller has read it already): presence and sizes of the shards here
    (checksums too with ``config.verify_checksums``), every index file by the backend (counts,
    offsets and sizes inside the tar). A sample that still fails mid-epoch raises ``ShardDataError``
    naming the shard."""
    if manifest is None:
        manifest = load_split(Path(root), split)
    check_shards(Path(root), manifest, check_hash=config.verify_checksums)
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"device {config.device!r} asked for, but CUDA is not available here")
    if resolve_backend(config.backend) == "dali":
        from pipelines.dali_backend import DaliLoader

        return DaliLoader(Path(root), manifest, config)
    from pipelines.torch_backend import TorchLoader

    return TorchLoader(Path(root), manifest, config)
