"""The run folder: resolved config, metrics stream, TensorBoard events, checkpoints, summary.

    OUT/config.toml         the resolved run config; `engine-run --config OUT/config.toml` repeats the run
    OUT/metrics.jsonl       one JSON object per log or eval point (step, phase, losses, images/s, metrics)
    OUT/tb/                 TensorBoard event files
    OUT/checkpoints/last.pt the latest checkpoint (atomic)
    OUT/summary.json        final eval metrics, written when the run completes
    OUT/demo_wall_s.json    seconds the training took, written by ``engine.runs.train_or_reuse`` (demo, sweeps)

The metrics stream is kept consistent with the checkpoint: on resume it is cut back to the
checkpoint's step, and a line torn by a crash is dropped with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.checkpoint import LAST_NAME
from engine.config import RunConfig, build_config, load_toml, to_toml
from shards.atomic_files import atomic_write_text

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)
CONFIG_NAME = "config.toml"
WALL_NAME = "demo_wall_s.json"


class RunFolderError(Exception):
    """A run folder that cannot be used as asked (e.g. it holds another run and --resume is off)."""


class RunFolder:
    def __init__(self, root: Path | str, is_main: bool = True) -> None:
        self.root = Path(root)
        self.is_main = is_main  # only rank 0 writes
        self._tb: SummaryWriter | None = None

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def checkpoint_path(self) -> Path:
        """The latest checkpoint: the one a resumed run, an export and a report read."""
        return self.checkpoints_dir / LAST_NAME

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def wall_path(self) -> Path:
        return self.root / WALL_NAME

    def holds_run(self) -> bool:
        return self.checkpoint_path.exists() or self.summary_path.exists()

    def check_start(self, resume: bool) -> None:
        """Refuse, before any work, to overwrite another run or to resume nothing."""
        if self.root.exists() and not self.root.is_dir():
            raise RunFolderError(f"--out {self.root} is a file, not a folder; choose another --out")
        if resume and not self.checkpoint_path.is_file():
            raise RunFolderError(f"--resume: no checkpoint at {self.checkpoint_path}; start without --resume")
        if not resume and self.holds_run():
            raise RunFolderError(
                f"{self.root} already holds a run (checkpoint or summary); pass --resume to continue it "
                f"or choose another --out"
            )

    def prepare(self, config: RunConfig, resume: bool) -> None:
        """Write the resolved config. A fresh start in a folder whose earlier run died before its
        first checkpoint starts clean: that run's logs would otherwise interleave with this one's."""
        if not self.is_main:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if not resume:
            self._clear_unfinished_logs()
        header = "# Resolved config of this run: `engine-run --config THIS_FILE` repeats it.\n"
        atomic_write_text(self.config_path, to_toml(config, header))

    def _clear_unfinished_logs(self) -> None:
        if self.metrics_path.exists():
            log.warning(
                "%s: no checkpoint holds these records (an earlier start died before one); starting them afresh",
                self.metrics_path,
            )
            self.metrics_path.unlink()
        shutil.rmtree(self.root / "tb", ignore_errors=True)

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint so the stream has no duplicates."""
        if not self.is_main or not self.metrics_path.exists():
            return
        kept = [record for record in read_metrics(self.metrics_path) if record["step"] <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(record) + "\n" for record in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(_finite_or_none(record)) + "\n")
        self._tensorboard_scalars(record)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.is_main:
            atomic_write_text(self.summary_path, json.dumps(_finite_or_none(summary), indent=1) + "\n")

    def read_summary(self) -> dict[str, Any] | None:
        """The finished run's summary (None: it did not finish); a RunFolderError naming file and key
        when it is not what ``write_summary`` writes."""
        if not self.summary_path.is_file():
            return None
        summary = _read_json(self.summary_path)
        if not isinstance(summary, dict):
            raise RunFolderError(f"{self.summary_path}: expected a JSON object of metrics, got {_short(summary)}")
        for key, value in summary.items():
            if (problem := _summary_value_problem(key, value)) is not None:
                raise RunFolderError(f"{self.summary_path}: key {key!r}: {problem}, got {_short(value)}")
        return summary

    def read_wall_s(self) -> float | None:
        if not self.wall_path.is_file():
            return None
        wall_s = _read_json(self.wall_path)
        if not _is_number(wall_s) or wall_s < 0:
            raise RunFolderError(f"{self.wall_path}: expected a number of seconds >= 0, got {_short(wall_s)}")
        return float(wall_s)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The metrics stream's records; none where the run wrote none."""
        return read_metrics(self.metrics_path) if self.metrics_path.is_file() else []

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


def saved_config(out_dir: Path | str) -> RunConfig:
    """The config a run folder was started with (its ``config.toml``)."""
    path = Path(out_dir) / CONFIG_NAME
    if not path.is_file():
        raise RunFolderError(f"{path} does not exist (is --out the folder of an earlier run?)")
    return build_config(load_toml(path), {}, source=str(path))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics stream; a torn last line (a crash mid-write) is dropped with a warning."""
    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning(
                    "%s: dropping a torn last line (%d bytes), written when a run died mid-write", path, len(line)
                )
                continue
            raise RunFolderError(
                f"{path} line {number} is not JSON: the metrics stream is damaged; move it away to resume"
            ) from None
    return records


def _finite_or_none(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunFolderError(f"{path} is not valid JSON ({error}); restore it or remove the run") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _summary_value_problem(key: str, value: Any) -> str | None:
    """What is wrong with one entry of summary.json: ``step`` a whole number >= 0, ``method`` (and the
    record labels ``kind``, ``phase``) a name, every other key a metric (a finite number, or null where
    it was not finite)."""
    if key == "step":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return None if ok else "expected a whole number of steps >= 0"
    if key in ("method", "kind", "phase"):
        return None if isinstance(value, str) and value else "expected a method name"
    return None if value is None or _is_number(value) else "expected a number (or null)"


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
