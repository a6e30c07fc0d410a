"""The run folder: resolved config, metrics stream, TensorBoard events, checkpoints, summary.

    OUT/config.json         the resolved RunConfig
    OUT/metrics.jsonl       one JSON object per log or eval point (step, phase, losses, images/s, metrics)
    OUT/tb/                 TensorBoard event files
    OUT/checkpoints/last.pt the latest checkpoint (atomic)
    OUT/summary.json        final eval metrics, written when the run completes
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from shards.manifest import atomic_write_text


class RunFolderError(Exception):
    """A run folder that cannot be used as asked (e.g. it holds another run and --resume is off)."""


class RunFolder:
    def __init__(self, root: Path, is_main: bool = True) -> None:
        self.root = Path(root)
        self.is_main = is_main  # only rank 0 writes
        self._tb = None

    @property
    def checkpoint_path(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def prepare(self, config_json: dict[str, Any], resume: bool) -> None:
        """Refuse to overwrite another run's checkpoint; on resume keep the folder as it is."""
        if not self.is_main:
            return
        if not resume and (self.checkpoint_path.exists() or self.summary_path.exists()):
            raise RunFolderError(
                f"{self.root} already holds a run (checkpoint or summary); pass --resume to continue it "
                f"or choose another --out"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "config.json", json.dumps(config_json, indent=1, default=str) + "\n")

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint so the stream has no duplicates."""
        if not self.is_main or not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(_finite_or_none(record)) + "\n")
        self._tensorboard_scalars(record)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.is_main:
            atomic_write_text(self.summary_path, json.dumps(_finite_or_none(summary), indent=1) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    def _tensorboard_scalars(self, record: dict[str, Any]) -> None:
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.root / "tb"))
        prefix = "eval" if record.get("kind") == "eval" else "train"
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def _finite_or_none(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
