"""The run folder: resolved config, metrics stream, TensorBoard events, checkpoints, summary.

    OUT/run.json            what marks the folder as a run of this project, written first: the class list
                            the model's outputs mean (with its sha256), and the label kind
    OUT/.engine-run.lock    held (``flock``) by the process that trains in the folder, for the life of the run
    OUT/config.toml         the resolved run config; `engine-run --config OUT/config.toml` repeats the run
    OUT/metrics.jsonl       one JSON object per log or eval point (step, phase, losses, images/s, metrics)
    OUT/tb/                 TensorBoard event files
    OUT/checkpoints/last.pt the latest checkpoint (atomic)
    OUT/summary.json        final eval metrics, written when the run completes
    OUT/demo_wall_s.json    seconds the training took, written by ``engine.runs.train_or_reuse`` (demo, sweeps)

A fresh start refuses a folder holding anything but a run of this project (docs/DESIGN.md, "The run
folder"): a folder with ``run.json``, a checkpoint or a summary (runs of releases before ``run.json``).
Two processes never train in one folder: the second finds the lock held and stops, naming the pid.

The metrics stream is kept consistent with the checkpoint: on resume it is cut back to the
checkpoint's step, and a line torn by a crash is dropped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.checkpoint import LAST_NAME
from engine.config import RunConfig, build_config, load_toml, to_toml
from shards.atomic_files import atomic_write_text
from shards.folder_lock import FolderBusyError, output_lock

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)
CONFIG_NAME = "config.toml"
WALL_NAME = "demo_wall_s.json"
RECORD_NAME = "run.json"
RUN_LOCK_NAME = ".engine-run.lock"
PROJECT = "mile"  # run.json's "project": a folder written by this trainer


class RunFolderError(Exception):
    """A run folder that cannot be used as asked (e.g. it holds another run and --resume is off)."""


@dataclass(frozen=True)
class ClassRecord:
    """The classes a run's outputs mean, in output order, with a fingerprint; kept in ``run.json``
    and in every checkpoint, so that export needs no data and resume and eval can refuse other classes."""

    class_names: tuple[str, ...]
    label_kind: str  # shards.format.LabelKind's value of the train split

    @property
    def sha256(self) -> str:
        return class_fingerprint(self.class_names)

    def to_json(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names), "class_names_sha256": self.sha256, "label_kind": self.label_kind}

    @classmethod
    def from_json(cls, data: Any, source: str) -> ClassRecord:
        """The record in ``data``; a RunFolderError naming ``source`` and the key when it is malformed."""
        if not isinstance(data, dict):
            raise RunFolderError(f"{source}: the class record must be a JSON object, found {type(data).__name__}")
        names, kind = data.get("class_names"), data.get("label_kind")
        if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
            raise RunFolderError(f"{source}: key 'class_names' must be a non-empty list of strings")
        if not isinstance(kind, str):
            raise RunFolderError(f"{source}: key 'label_kind' must be a string")
        record = cls(tuple(names), kind)
        if data.get("class_names_sha256") != record.sha256:
            raise RunFolderError(
                f"{source}: key 'class_names_sha256' does not match its class_names (the file was edited or damaged); "
                "restore it from the run's checkpoint or a copy"
            )
        return record


def class_fingerprint(names: Sequence[str]) -> str:
    """sha256 of the class list as compact JSON: equal exactly when the names and their order are."""
    return hashlib.sha256(json.dumps(list(names), ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def class_difference(ours: Sequence[str], theirs: Sequence[str]) -> str | None:
    """None when the lists are equal, else where they first differ: "they first differ at class index
    2: 'cat' vs 'dog'" (``ours`` first; "(none)" past a list's end)."""
    if list(ours) == list(theirs):
        return None
    index = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))

    def at(names: Sequence[str]) -> str:
        return repr(names[index]) if index < len(names) else "(none)"

    return f"they first differ at class index {index}: {at(ours)} vs {at(theirs)}"


def checkpoint_classes(payload: dict[str, Any], path: Path) -> ClassRecord | None:
    """The class record of a checked checkpoint payload; None for one written before records existed."""
    if "classes" not in payload:
        return None
    return ClassRecord.from_json(payload["classes"], f"checkpoint {path}")


def check_checkpoint_classes(payload: dict[str, Any], data: ClassRecord, path: Path) -> None:
    """Resuming: the checkpoint's weights must have been trained on the data's classes, in its order."""
    recorded = checkpoint_classes(payload, path)
    difference = None if recorded is None else class_difference(recorded.class_names, data.class_names)
    if difference:
        raise RunFolderError(
            f"--resume: checkpoint {path} was trained on other classes than the train split's now; {difference}. "
            "Resume on the data it was trained on, or start a new run"
        )


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

    @property
    def record_path(self) -> Path:
        return self.root / RECORD_NAME

    def holds_run(self) -> bool:
        return self.checkpoint_path.exists() or self.summary_path.exists()

    def is_ours(self) -> bool:
        """The folder was written by this trainer: a ``run.json`` of this project, or a checkpoint or
        summary (runs of older releases). A ``run.json`` of the user's own is not taken for ours."""
        return self.holds_run() or self._marked()

    def _marked(self) -> bool:
        try:
            data = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent, unreadable, not JSON or not UTF-8
            return False
        return isinstance(data, dict) and data.get("project") == PROJECT

    def foreign_entries(self) -> list[str]:
        """What the folder holds besides its lock file, when it is not a run of this project."""
        if not self.root.is_dir() or self.is_ours():
            return []
        return sorted(path.name for path in self.root.iterdir() if path.name != RUN_LOCK_NAME)

    def check_start(self, resume: bool) -> None:
        """Refuse, before any work, to overwrite another run or the user's files, or to resume nothing."""
        if self.root.exists() and not self.root.is_dir():
            raise RunFolderError(f"--out {self.root} is a file, not a folder; choose another --out")
        if resume and not self.checkpoint_path.is_file():
            raise RunFolderError(f"--resume: no checkpoint at {self.checkpoint_path}; start without --resume")
        if not resume and self.holds_run():
            raise RunFolderError(
                f"{self.root} already holds a run (checkpoint or summary); pass --resume to continue it "
                f"or choose another --out"
            )
        foreign = self.foreign_entries()
        if not resume and foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise RunFolderError(
                f"--out {self.root} is not empty ({shown}) and is not a run of engine-run (no {RECORD_NAME}, "
                "checkpoint or summary): its files would be overwritten; choose a new or empty --out"
            )

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's lock while the ``with`` block runs (the main rank only: the others write
        nothing); a second process gets a RunFolderError naming the holder's pid."""
        if not self.is_main:
            yield
            return
        if self.root.exists() and not self.root.is_dir():
            raise RunFolderError(f"--out {self.root} is a file, not a folder; choose another --out")
        with ExitStack() as held:
            try:
                held.enter_context(output_lock(self.root, lock_name=RUN_LOCK_NAME, writer="engine-run"))
            except FolderBusyError as error:
                raise RunFolderError(str(error)) from None
            yield

    def read_record(self) -> ClassRecord | None:
        """The run's class record (``run.json``); None for a run of a release that wrote none."""
        if not self.record_path.is_file():
            return None
        try:
            data = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RunFolderError(f"{self.record_path} is not JSON ({error}); restore it from a copy") from None
        if not isinstance(data, dict) or data.get("project") != PROJECT:
            raise RunFolderError(f"{self.record_path}: key 'project' must be {PROJECT!r}; this is not a run's record")
        return ClassRecord.from_json(data, str(self.record_path))

    def prepare(self, config: RunConfig, resume: bool, record: ClassRecord | None = None) -> None:
        """Write the class record and the resolved config. A fresh start in a folder whose earlier run
        died before its first checkpoint starts clean: that run's logs would otherwise interleave with this one's."""
        if not self.is_main:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if record is not None:
            atomic_write_text(self.record_path, json.dumps({"project": PROJECT, **record.to_json()}, indent=1) + "\n")
        if not resume:
            self._clear_unfinished_logs()
        header = "# Resolved config of this run: `engine-run --config THIS_FILE --out NEW_FOLDER` repeats it.\n"
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
