"""End-to-end throughput, side by side in one run on the same synthetic photo shards (~500x375
JPEGs, the loader benchmark's generator):

- loader alone: each available loader as the trainer builds it (DALI when it imports, the torch
  backend; nvJPEG decode on CUDA), and the released code's PIL + torchvision DataLoader;
- engine alone: the engine's teacher and student steps on a batch already on the device, CUDA
  graphs on and off, and each phase-switch action's device time by CUDA events;
- end to end: loader + ``Engine.train_step`` as the trainer runs them (run-ahead ring, device-side
  statistics, phases switching every few steps);
- the released code's way end to end: PIL DataLoader, fp32 NCHW eager steps on materialised
  targets, a ``deepcopy`` teacher at every switch.

Every row: images/s and ms/step over ``steps`` timed steps after ``warmup_steps`` (wall clock up
to the device's end: a synchronize closes each row), peak GPU memory of torch's allocator, and GPU
telemetry sampled by NVML during the row (utilisation, memory, SM clock, power; absent on CPU).
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.engine_steps import EngineBenchConfig, Timer, synthetic_batch
from benchmarks.loaders import SPLIT, LoaderBenchConfig, PilFolderLoader, photo_jpegs, write_bench_data
from benchmarks.telemetry import GpuSampler, format_telemetry
from engine.build import Engine, EngineSpec, build_engine
from engine.config import Method, MethodConfig, RunConfig, build_config
from engine.data import loader_config
from engine.models import build_model
from engine.phases import STUDENT, TEACHER, PhaseAction, PhasePlan
from engine.steps import RunAheadLimit
from engine.trainer import TrainStats
from pipelines import build_loader, dali_import_error
from pipelines.contract import Batch

SWITCH_REPEATS = 5
LOADER, ENGINE, SWITCH, END_TO_END, BASELINE = (
    "loader alone",
    "engine alone",
    "phase switch",
    "end to end",
    "released-code baseline",
)


@dataclass(frozen=True)
class E2EConfig:
    arch: str = "resnet50"
    image_size_px: int = 224
    batch_size: int = 256
    num_classes: int = 1000
    num_images: int = 1024  # synthetic photos; rows cycle through them epoch after epoch
    steps: int = 20  # timed steps per row
    warmup_steps: int = 5
    workers: int = 8  # every loader: DataLoader processes / DALI threads
    k_teacher_steps: int = 10  # end-to-end rows switch phases as a MILe run does
    k_student_steps: int = 5
    device: str = "cuda"
    seed: int = 0


@dataclass
class E2ERow:
    group: str
    name: str
    images_per_s: float | None = None
    ms_per_step: float | None = None
    peak_gpu_mib: float | None = None
    telemetry: dict[str, Any] | None = None
    note: str = ""
    error: str | None = None


# -- shared pieces ---------------------------------------------------------------------------------


def e2e_run_config(config: E2EConfig, graphs: bool, backend: str) -> RunConfig:
    """What ``engine-run`` would be given for these settings (MILe, ImageNet-style augmentation)."""
    return build_config(
        {},
        {
            "arch": config.arch,
            "method.name": "mile",
            "method.k_teacher_steps": config.k_teacher_steps,
            "method.k_student_steps": config.k_student_steps,
            "global_batch_size": config.batch_size,
            "num_steps": 1_000_000,
            "data.image_size_px": config.image_size_px,
            "data.augment": True,
            "data.backend": backend,
            "data.num_workers": config.workers,
            "device": config.device,
            "cuda_graphs": graphs,
            "seed": config.seed,
        },
    )


def endless(loader: Any) -> Generator[Any, None, None]:
    """Batches epoch after epoch."""
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def timed_row(
    group: str, name: str, config: E2EConfig, device: torch.device, run_steps: Callable[[int], None]
) -> E2ERow:
    """Warm-up steps, then ``config.steps`` timed ones up to the device's end, with memory and telemetry."""
    run_steps(config.warmup_steps)
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with GpuSampler(device) as sampler:
        start = time.perf_counter()
        run_steps(config.steps)
        _synchronize(device)  # SYNC: row boundary
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return E2ERow(
        group, name, config.batch_size * config.steps / seconds, 1000 * seconds / config.steps, peak, sampler.summary()
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    """Give back what the last rows' models and graphs held, so the next rows' peaks are their own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _attempt(group: str, name: str, action: Callable[[], list[E2ERow]]) -> list[E2ERow]:
    """``action()``'s rows, or one row naming the error: a broken row must not hide the others."""
    try:
        return action()
    except Exception as error:
        return [E2ERow(group, name, error=f"{type(error).__name__}: {error}")]


# -- loaders ----------------------------------------------------------------------------------------


def trainer_loaders(root: Path, config: E2EConfig, device: torch.device) -> tuple[dict[str, Any], list[E2ERow]]:
    """The training loaders the trainer would build here, by row name (DALI first when it imports),
    and a row for each that could not be built."""
    cuda = device.type == "cuda"
    names = {
        "dali": f"DALI backend ({'mixed' if cuda else 'CPU'} decode)",
        "torch": f"torch backend ({'nvJPEG' if cuda else 'CPU'} decode)",
    }
    loaders, failed = {}, []
    for backend in (["dali"] if dali_import_error() is None else []) + ["torch"]:
        settings = loader_config(e2e_run_config(config, True, backend), True, 0, 1, device)
        try:
            loaders[names[backend]] = build_loader(root / "shards", SPLIT, settings)
        except Exception as error:
            failed.append(E2ERow(LOADER, names[backend], error=f"{type(error).__name__}: {error}"))
    return loaders, failed


def pil_loader(root: Path, config: E2EConfig, device: torch.device) -> PilFolderLoader:
    settings = LoaderBenchConfig(
        config.num_images, config.batch_size, config.image_size_px, config.workers, seed=config.seed
    )
    return PilFolderLoader(root, settings, pin_memory=device.type == "cuda")


def loader_rows(loaders: dict[str, Any], config: E2EConfig, device: torch.device) -> list[E2ERow]:
    rows = []
    for name, loader in loaders.items():
        rows += _attempt(LOADER, name, functools.partial(_streamed_rows, LOADER, name, config, device, loader, _taker))
    return rows


def _taker(stream: Iterator[Any]) -> Callable[[int], None]:
    def take(count: int) -> None:
        for _ in range(count):
            next(stream)

    return take


def _streamed_rows(*args: Any) -> list[E2ERow]:
    """``[streamed_row(*args)]``, for ``_attempt``."""
    return [streamed_row(*args)]


def streamed_row(
    group: str,
    name: str,
    config: E2EConfig,
    device: torch.device,
    loader: Any,
    make_steps: Callable[[Iterator[Any]], Callable[[int], None]],
) -> E2ERow:
    """``timed_row`` over a fresh stream of ``loader``'s batches, closed at the end (a loader
    serves one epoch at a time; closing ends this row's epoch before the next row starts one)."""
    stream = endless(loader)
    try:
        return timed_row(group, name, config, device, make_steps(stream))
    finally:
        stream.close()


def total_images(config: E2EConfig) -> int:
    """Enough images that no row crosses an epoch end (DALI builds a pipeline per epoch)."""
    return max(config.num_images, (config.warmup_steps + config.steps + 1) * config.batch_size)


# -- the engine alone and its phase switch ------------------------------------------------------------


def build_bench_engine(config: E2EConfig, device: torch.device, graphs: bool) -> tuple[Engine, Batch, str | None]:
    """The engine, a batch like the loader's (channels-last, bf16 on CUDA), and why its steps are
    eager (None: captured as CUDA graphs)."""
    engine = build_engine(e2e_run_config(config, graphs, "torch"), EngineSpec(config.num_classes), device)
    shape = EngineBenchConfig(config.arch, config.image_size_px, config.batch_size, config.num_classes)
    dtype = engine.settings.autocast_dtype or torch.float32
    images, labels = synthetic_batch(shape, device, True, dtype)
    batch = Batch(images, labels)
    engine.lr.fill_(engine.lr_at(0))
    return engine, batch, engine.capture(batch)


def engine_rows(engine: Engine, batch: Batch, kind: str, config: E2EConfig, device: torch.device) -> list[E2ERow]:
    rows = []
    for phase in (TEACHER, STUDENT):

        def run(count: int, phase=phase) -> None:
            for _ in range(count):
                engine.stepper(phase, batch.images, batch.labels, None)

        rows.append(timed_row(ENGINE, f"engine {phase} step ({kind})", config, device, run))
    return rows


def switch_rows(engine: Engine, kind: str, device: torch.device) -> list[E2ERow]:
    """Device time of each phase-switch action (median of ``SWITCH_REPEATS``), by CUDA events on a GPU."""
    timer, rows = Timer(device), []
    for action in (PhaseAction.SNAPSHOT_TEACHER, PhaseAction.SAVE_STUDENT, PhaseAction.RESTORE_STUDENT):
        engine.switch.apply((action,))  # untimed once: the first save allocates the saved-student mirror
        seconds = [timer.seconds(functools.partial(engine.switch.apply, (action,))) for _ in range(SWITCH_REPEATS)]
        rows.append(E2ERow(SWITCH, f"engine {action.value} ({kind})", ms_per_step=1000 * statistics.median(seconds)))
    return rows


# -- end to end: loader + Engine.train_step as the trainer runs them ---------------------------------


def trainer_steps(engine: Engine, stream: Iterator[Batch], device: torch.device) -> Callable[[int], None]:
    """The trainer's per-step protocol (``Trainer._timed_step``) from step 0, phases switching."""
    ring, stats, step = RunAheadLimit(device), TrainStats(device), [0]

    def run(count: int) -> None:
        for _ in range(count):
            batch = next(stream)
            ring.wait_turn()
            result = engine.train_step(step[0], batch)
            stats.update(result, batch.labels, step[0])
            ring.step_queued(batch)
            step[0] += 1

    return run


def end_to_end_rows(
    engine: Engine, kind: str, loaders: dict[str, Any], config: E2EConfig, device: torch.device
) -> list[E2ERow]:
    rows = []

    def make_steps(stream: Iterator[Batch]) -> Callable[[int], None]:
        return trainer_steps(engine, stream, device)

    for name, loader in loaders.items():
        label = f"{name} + engine ({kind})"
        rows += _attempt(
            END_TO_END,
            label,
            functools.partial(_streamed_rows, END_TO_END, label, config, device, loader, make_steps),
        )
    return rows


# -- the released code's way --------------------------------------------------------------------------


class ReleasedCodeBaseline:
    """fp32 NCHW model, eager steps on materialised BCE targets, ``torch.optim.SGD`` defaults, and
    a teacher re-made by ``copy.deepcopy`` at every teacher -> student switch."""

    def __init__(self, config: E2EConfig, device: torch.device) -> None:
        torch.manual_seed(config.seed)
        self.device, self.num_classes, self.rho = device, config.num_classes, 0.25
        self.model = build_model(config.arch, config.num_classes, True).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
        self.teacher = copy.deepcopy(self.model).eval()
        self.plan = PhasePlan(
            MethodConfig(
                name=Method.MILE, k_teacher_steps=config.k_teacher_steps, k_student_steps=config.k_student_steps
            )
        )

    def step(self, step: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        phase = self.plan.position(step).phase
        if step > 0 and phase is STUDENT and self.plan.position(step - 1).phase is TEACHER:
            self.new_teacher()
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        if phase is STUDENT:
            with torch.no_grad():
                targets = (torch.sigmoid(self.teacher(images)) > self.rho).float()
        else:
            targets = F.one_hot(labels, self.num_classes).float()
        self.optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(self.model(images), targets, reduction="sum").div(len(labels)).backward()
        self.optimizer.step()

    def new_teacher(self) -> None:
        self.teacher = copy.deepcopy(self.model).eval()


def baseline_rows(loader: PilFolderLoader, config: E2EConfig, device: torch.device) -> list[E2ERow]:
    baseline = ReleasedCodeBaseline(config, device)

    def make_steps(stream: Iterator[Any]) -> Callable[[int], None]:
        step = [0]

        def run(count: int) -> None:
            for _ in range(count):
                images, labels = next(stream)
                baseline.step(step[0], images, labels)
                step[0] += 1

        return run

    row = streamed_row(
        BASELINE, "PIL DataLoader + eager fp32 NCHW steps, deepcopy teacher", config, device, loader, make_steps
    )
    timer = Timer(device)
    seconds = [timer.seconds(baseline.new_teacher) for _ in range(SWITCH_REPEATS)]
    switch = E2ERow(SWITCH, "baseline deepcopy teacher", ms_per_step=1000 * statistics.median(seconds))
    return [row, switch]


# -- the whole benchmark ------------------------------------------------------------------------------


def run_e2e_bench(config: E2EConfig) -> list[E2ERow]:
    device = torch.device(config.device)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        root = Path(tmp)
        photos = photo_jpegs(config.num_images, config.seed)
        write_bench_data(root, [photos[i % len(photos)] for i in range(total_images(config))], config.num_classes)
        loaders, rows = trainer_loaders(root, config, device)
        baseline_loader = pil_loader(root, config, device)
        try:
            rows += loader_rows(
                {**loaders, "PIL + torchvision DataLoader (released code)": baseline_loader}, config, device
            )
            for graphs in (True, False) if device.type == "cuda" else (False,):
                rows += _attempt(
                    ENGINE,
                    f"engine (graphs {graphs})",
                    functools.partial(_engine_and_end_to_end, loaders, config, device, graphs),
                )
                _release(device)
            rows += _attempt(BASELINE, "released-code baseline", lambda: baseline_rows(baseline_loader, config, device))
        finally:
            for loader in [*loaders.values(), baseline_loader]:
                loader.close()
    return rows


def _engine_and_end_to_end(
    loaders: dict[str, Any], config: E2EConfig, device: torch.device, graphs: bool
) -> list[E2ERow]:
    engine, batch, eager_reason = build_bench_engine(config, device, graphs)
    kind = "eager" if eager_reason else "graphs"
    rows = engine_rows(engine, batch, kind, config, device) + switch_rows(engine, kind, device)
    if graphs and eager_reason:
        rows[0].note = eager_reason  # asked for graphs, got eager steps: say why
    if graphs or device.type != "cuda":  # end to end as the trainer runs: with graphs where CUDA has them
        rows += end_to_end_rows(engine, kind, loaders, config, device)
    return rows


# -- output -------------------------------------------------------------------------------------------


def format_table(rows: list[E2ERow]) -> str:
    lines = [f"{'group':<23} {'row':<58} {'img/s':>9} {'ms/step':>9} {'peak GiB':>8}  GPU util, mem, SM clock, power"]
    for r in rows:
        if r.error:
            lines.append(f"{r.group:<23} {r.name:<58} failed: {r.error}")
            continue
        rate = f"{r.images_per_s:9.1f}" if r.images_per_s is not None else f"{'':9}"
        peak = f"{r.peak_gpu_mib / 1024:8.2f}" if r.peak_gpu_mib is not None else f"{'-':>8}"
        note = f"  ({r.note})" if r.note else ""
        lines.append(
            f"{r.group:<23} {r.name:<58} {rate} {r.ms_per_step:9.3f} {peak}  {format_telemetry(r.telemetry)}{note}"
        )
    return "\n".join(lines)


def write_json(path: Path, config: E2EConfig, rows: list[E2ERow], environment: dict[str, Any]) -> None:
    payload = {
        "benchmark": "e2e",
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
        "environment": environment,
        "rows": [asdict(r) for r in rows],
    }
    Path(path).write_text(json.dumps(payload, indent=1) + "\n")
