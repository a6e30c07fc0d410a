"""Engine-only throughput: images/s per phase with synthetic batches already on the device.

Rows, measured side by side in one process: the engine's teacher and student steps with CUDA
graphs on and off (bf16 autocast, channels-last), the phase-switch gap (device-side teacher
snapshot), and a plain eager loop in the released code's style (NCHW, fp32, a ``deepcopy``
teacher re-made at every switch, thresholded targets materialised). Timed with device events
after warm-up; medians and spreads over repeats (docs/DESIGN.md, "Measuring").
"""

from __future__ import annotations

import copy
import functools
import json
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.build import EngineSpec, build_engine
from engine.config import RunConfig, build_config
from engine.models import build_model
from engine.phases import STUDENT, TEACHER, PhaseAction
from pipelines.contract import Batch


@dataclass(frozen=True)
class EngineBenchConfig:
    arch: str = "resnet50"
    image_size_px: int = 224
    batch_size: int = 256
    num_classes: int = 1000
    steps_per_repeat: int = 20
    repeats: int = 5
    warmup_steps: int = 5
    device: str = "cuda"
    rho: float = 0.25


@dataclass(frozen=True)
class BenchRow:
    name: str
    images_per_s_median: float
    images_per_s_min: float
    images_per_s_max: float
    ms_per_step_median: float


class Timer:
    """Elapsed seconds of a callable, by CUDA events on the GPU and the wall clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def seconds(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()  # SYNC: benchmark boundary
        return begin.elapsed_time(end) / 1000.0


def _row(name: str, seconds: list[float], config: EngineBenchConfig) -> BenchRow:
    rates = [config.batch_size * config.steps_per_repeat / s for s in seconds]
    per_step_ms = statistics.median(seconds) / config.steps_per_repeat * 1000
    return BenchRow(name, statistics.median(rates), min(rates), max(rates), per_step_ms)


def _measure(steps: Mapping[str, Callable[[], object]], config: EngineBenchConfig, timer: Timer) -> list[BenchRow]:
    """Round-robin repeats (each round times every step once), so background load hits all rows alike."""
    for step in steps.values():
        for _ in range(config.warmup_steps):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(config.repeats):
        for name, step in steps.items():
            seconds[name].append(timer.seconds(functools.partial(_repeat, step, config.steps_per_repeat)))
    return [_row(name, times, config) for name, times in seconds.items()]


def _repeat(step: Callable[[], object], times: int) -> None:
    for _ in range(times):
        step()


def synthetic_batch(config: EngineBenchConfig, device: torch.device, channels_last: bool, dtype: torch.dtype):
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(config.batch_size, 3, config.image_size_px, config.image_size_px, generator=generator)
    labels = torch.randint(0, config.num_classes, (config.batch_size,), generator=generator)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device, dtype).contiguous(memory_format=memory_format), labels.to(device)


def bench_run_config(config: EngineBenchConfig, graphs: bool) -> RunConfig:
    """The run config ``engine-run`` would use for these settings (MILe, so both phases exist)."""
    return build_config(
        {},
        {
            "arch": config.arch,
            "method.name": "mile",
            "method.rho": config.rho,
            "global_batch_size": config.batch_size,
            "num_steps": 1_000_000,
            "optim.weight_decay": 5e-5,
            "device": config.device,
            "cuda_graphs": graphs,
        },
    )


def engine_rows(config: EngineBenchConfig, graphs: bool) -> list[BenchRow]:
    """The engine's own steps (what ``engine-run`` executes), one row per phase plus the switch."""
    device = torch.device(config.device)
    cuda = device.type == "cuda"
    engine = build_engine(bench_run_config(config, graphs), EngineSpec(config.num_classes), device)
    images, labels = synthetic_batch(config, device, True, torch.bfloat16 if cuda else torch.float32)
    batch = Batch(images, labels)
    engine.lr.fill_(engine.lr_at(0))
    engine.capture(batch)
    timer, suffix = Timer(device), "graphs" if engine.stepper.graphed else "eager"
    steps = {
        f"engine {phase} step ({suffix})": functools.partial(engine.stepper, phase, images, labels, None)
        for phase in (TEACHER, STUDENT)
    }
    rows = _measure(steps, config, timer)
    snapshot = (PhaseAction.SNAPSHOT_TEACHER,)
    switch_seconds = [timer.seconds(lambda: engine.switch.apply(snapshot)) for _ in range(config.repeats)]
    rows.append(
        BenchRow(f"phase switch: teacher snapshot ({suffix})", 0.0, 0.0, 0.0, statistics.median(switch_seconds) * 1000)
    )
    return rows


def baseline_rows(config: EngineBenchConfig) -> list[BenchRow]:
    """The released code's style: NCHW fp32 eager steps; a deepcopy teacher at every phase switch."""
    device = torch.device(config.device)
    torch.manual_seed(0)
    model = build_model(config.arch, config.num_classes, True).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    images, labels = synthetic_batch(config, device, False, torch.float32)
    holder = {"teacher": copy.deepcopy(model).eval()}

    def teacher_step() -> None:
        optimizer.zero_grad()
        targets = F.one_hot(labels, config.num_classes).float()
        F.binary_cross_entropy_with_logits(model(images), targets, reduction="sum").div(len(labels)).backward()
        optimizer.step()

    def student_step() -> None:
        optimizer.zero_grad()
        with torch.no_grad():
            targets = (torch.sigmoid(holder["teacher"](images)) > config.rho).float()
        F.binary_cross_entropy_with_logits(model(images), targets, reduction="sum").div(len(labels)).backward()
        optimizer.step()

    timer = Timer(device)
    steps = {
        "eager baseline teacher step (NCHW fp32)": teacher_step,
        "eager baseline student step (NCHW fp32)": student_step,
    }
    rows = _measure(steps, config, timer)
    deepcopy_seconds = [
        timer.seconds(lambda: holder.update(teacher=copy.deepcopy(model).eval())) for _ in range(config.repeats)
    ]
    rows.append(
        BenchRow("phase switch: deepcopy teacher (baseline)", 0.0, 0.0, 0.0, statistics.median(deepcopy_seconds) * 1000)
    )
    return rows


def run_engine_bench(config: EngineBenchConfig) -> list[BenchRow]:
    rows = engine_rows(config, graphs=True)
    if config.device.startswith("cuda"):
        rows += engine_rows(config, graphs=False)
    return rows + baseline_rows(config)


def format_table(rows: list[BenchRow]) -> str:
    lines = [f"{'measurement':52s} {'img/s median':>13s} {'min':>9s} {'max':>9s} {'ms/step':>9s}"]
    for row in rows:
        lines.append(
            f"{row.name:52s} {row.images_per_s_median:13.1f} {row.images_per_s_min:9.1f} {row.images_per_s_max:9.1f} "
            f"{row.ms_per_step_median:9.3f}"
        )
    return "\n".join(lines)


def write_json(path: Path, config: EngineBenchConfig, rows: list[BenchRow], environment: dict) -> None:
    payload = {"config": asdict(config), "environment": environment, "rows": [asdict(r) for r in rows]}
    Path(path).write_text(json.dumps(payload, indent=1) + "\n")
