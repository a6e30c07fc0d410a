"""The GPU checks behind ``tools/gpu_checks.sh``, one subcommand each, runnable alone:

    python -m benchmarks.gpu_checks CHECK --out DIR

Each writes ``DIR/<id>-<name>.json`` and ends with one line ``RESULT <id> PASS|FAIL|SKIP <summary>``
(exit code 1 on FAIL). Checks needing CUDA print SKIP without it; G2 and G7 print SKIP without DALI.

In the order ``tools/gpu_checks.sh`` runs them (value first; docs/PERFORMANCE.md, "GPU checks"):

- G0 env: versions (torch, CUDA, cuDNN, driver, torchvision, DALI), the current device, project imports.
- G1 graph-tests: ``pytest -m gpu`` (captured steps == eager steps on the phase schedule, negative
  control, no host sync in ``Engine.train_step`` and in the real ``Trainer`` loop; metrics on device).
- G4 e2e: ``bench.py e2e``'s matrix (ResNet-50, 224 px, bf16, batch 256, 50 timed steps per row after
  25 untimed), the released-code baseline included.
- G5 switch: each phase-switch action's device time (CUDA events), host time, bytes and tensors
  copied, no allocation, no sync, against a ``deepcopy`` teacher.
- G3 hot-loop: the real ``Trainer`` on photo shards for ~30 steps, observed through its hooks
  (``engine.hooks``): no host sync in any step's enqueue (``set_sync_debug_mode("error")``), none
  in any loader fetch (``"warn"``, counted), and step N queued before the device finished step N-1
  (CUDA events) in most steps.
- G8 ddp-graphs: one process as a DDP job of world size 1 (NCCL, init from the environment with
  MASTER_ADDR=127.0.0.1), bf16 gradient compression on: graphs on equal graphs off step by step, the
  compression hook inside the captured step (bf16-exact gradients after a replay), NCCL kernels in a
  captured graph, and the captured DDP step at most 5% slower than the captured non-DDP step.
- G6 decode: torch backend nvJPEG decode vs CPU decode (and DALI mixed vs CPU where DALI imports):
  mean absolute difference < 1/255, labels equal, channels-last strides.
- G2 dali-lifetime: bf16 and float32 DALI batches from a pass with the device stalled before every
  fetch equal those of a synchronised pass (DALI's buffers outlive the work queued on them).
- G7 dali-capture: CUDA-graph capture while a DALI iterator prefetches, then training on its batches.

Project modules are imported inside each check, so that G0 can report a missing dependency.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import typer

from engine.hooks import StepObserver

app = typer.Typer(help="GPU checks; each prints a RESULT line and writes JSON.", no_args_is_help=True)
OUT_OPTION = typer.Option(Path("gpu-checks"), "--out", help="Folder for the JSON results.")
PIXEL_TOLERANCE = 1 / 255  # mean absolute difference of decoded images, in [0, 1] pixel units
RUN_AHEAD_FRACTION_MIN = 0.8  # G3: steps queued while the device still ran the step before
# G2: a sleep kernel of ~25 ms at 2 GHz before each fetch, so that the work queued on a batch runs late
STALL_CYCLES = 50_000_000
# G4: timed steps per row, after a warm-up longer than the deepest loader prefetch (PIL DataLoader: 12 x 2)
E2E_TIMED_STEPS, E2E_WARMUP_STEPS = 50, 25
# G8: graphed vs eager DDP steps, error relative to each step's movement (as G1: a quarter of a bf16
# ulp at the median, 5e-2 at most), and the DDP step's time over the non-DDP step's
DDP_ERROR_MEDIAN, DDP_ERROR_MAX, DDP_SLOWDOWN_MAX = 1e-3, 5e-2, 1.05


# -- plumbing --------------------------------------------------------------------------------------


def verdict(check_id: str, name: str, out: Path, passed: bool | None, summary: str, details: dict[str, Any]) -> None:
    """Write the JSON, print the RESULT line, exit 1 on FAIL (``passed`` None = SKIP)."""
    word = "SKIP" if passed is None else ("PASS" if passed else "FAIL")
    out.mkdir(parents=True, exist_ok=True)
    payload = {"check": check_id, "name": name, "result": word, "summary": summary, **details}
    (out / f"{check_id}-{name}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"RESULT {check_id} {word} {summary}", flush=True)
    if passed is False:
        raise typer.Exit(1)


def guarded(check_id: str, name: str, out: Path, body: Callable[[], tuple[bool | None, str, dict[str, Any]]]) -> None:
    """Run a check; an exception is a FAIL naming it (with the traceback in the JSON)."""
    try:
        passed, summary, details = body()
    except Exception as error:
        traceback.print_exc()
        passed, summary, details = False, f"{type(error).__name__}: {error}", {"traceback": traceback.format_exc()}
    verdict(check_id, name, out, passed, summary, details)


def no_cuda() -> tuple[None, str, dict[str, Any]] | None:
    return None if torch.cuda.is_available() else (None, "no CUDA device here", {})


def dali_missing() -> tuple[None, str, dict[str, Any]] | None:
    from pipelines import dali_import_error

    reason = dali_import_error()
    return (None, f"DALI does not import ({reason})", {}) if reason else None


def set_sync_mode(device: torch.device, mode: str) -> None:
    """``torch.cuda.set_sync_debug_mode`` on CUDA; nothing to watch on the CPU (so the checks' code
    also runs there, for tests)."""
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode(mode)


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def photo_shards(root: Path, num_images: int, num_classes: int, seed: int = 0) -> Path:
    """Synthetic ~500x375 photo JPEGs as split ``bench`` in ``root/shards`` (and an image folder)."""
    from benchmarks.loaders import photo_jpegs, write_bench_data

    write_bench_data(root, photo_jpegs(num_images, seed), num_classes)
    return root / "shards"


# -- G0 environment ----------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(
            current_device=torch.cuda.current_device(),
            device_count=torch.cuda.device_count(),
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
        )
    env["driver"] = _driver_version()
    for module in ("torchvision", "numpy", "PIL", "sklearn", "timm", "tomli_w", "pynvml", "nvidia.dali"):
        env[module] = _version_of(module)
    return env


def _version_of(module: str) -> str:
    try:
        imported = __import__(module, fromlist=["__version__"])
    except Exception as error:
        return f"missing ({type(error).__name__}: {error})"
    return str(getattr(imported, "__version__", "present"))


def _driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception as error:
        return f"unknown ({type(error).__name__})"


@app.command("env")
def check_env(out: Path = OUT_OPTION) -> None:
    """G0: versions and the current device; FAIL when CUDA or a project import is missing."""

    def body() -> tuple[bool | None, str, dict[str, Any]]:
        env = environment()
        problems = [] if env["cuda_available"] else ["CUDA not available"]
        for module in ("engine.trainer", "benchmarks.e2e", "pipelines"):
            try:
                __import__(module)
            except Exception as error:
                problems.append(f"import {module}: {type(error).__name__}: {error}")
        summary = "; ".join(problems) or (
            f"torch {env['torch']} CUDA {env['torch_cuda']} driver {env['driver']} "
            f"{env.get('device_name')} (cuda:{env.get('current_device')}) DALI {env['nvidia.dali']}"
        )
        print(json.dumps(env, indent=1))
        return not problems, summary, {"environment": env}

    guarded("G0", "env", out, body)


# -- G1 the GPU tests ----------------------------------------------------------------------------------


@app.command("graph-tests")
def check_graph_tests(out: Path = OUT_OPTION) -> None:
    """G1: ``pytest -m gpu`` on the GPU tests; PASS when they all ran and passed."""

    def body() -> tuple[bool | None, str, dict[str, Any]]:
        if skip := no_cuda():
            return skip
        out.mkdir(parents=True, exist_ok=True)
        junit = out / "G1-junit.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "gpu",
            "-rA",
            f"--junitxml={junit}",
            "tests/test_gpu.py",
            "tests/test_metrics.py",
        ]
        result = subprocess.run(command, text=True)
        counts = _junit_counts(junit)
        ran = counts.get("tests", 0) - counts.get("skipped", 0)
        passed = result.returncode == 0 and ran > 0
        return passed, f"pytest exit {result.returncode}: {counts}", {"command": command, "counts": counts}

    guarded("G1", "graph-tests", out, body)


def _junit_counts(path: Path) -> dict[str, int]:
    import xml.etree.ElementTree as ElementTree

    if not path.is_file():
        return {}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


# -- G3 the real Trainer's hot loop ---------------------------------------------------------------------


@dataclass
class HotLoopResult:
    steps_checked: int = 0
    engine_sync_error: str | None = None  # the first host sync inside a step's enqueue (engine + statistics)
    loader_syncs: list[str] = field(default_factory=list)  # sync warnings raised while fetching a batch
    # per step N >= 2: whether step N was queued while the device still ran step N-1 (CUDA events)
    queued_ahead: list[bool] = field(default_factory=list)
    log_records: list[dict[str, Any]] = field(default_factory=list)  # the trainer's own log points
    seconds: float = 0.0

    @property
    def run_ahead_fraction(self) -> float:
        return sum(self.queued_ahead) / max(1, len(self.queued_ahead))


class HotLoopProbe(StepObserver):
    """G3's observer of the real trainer (``engine.hooks``), from step 1 on (step 0 captures the graphs
    and synchronises by design): sync debug mode "warn" around each loader fetch (warnings
    counted), "error" around each step's enqueue, and one CUDA event after each enqueue: at step N's,
    step N-1's event still pending means the host had queued step N before the device finished step N-1."""

    def __init__(self, result: HotLoopResult, device: torch.device) -> None:
        self.result, self.device = result, device
        self.in_step = False  # inside a step's enqueue: a sync error raised now is the engine's
        self._catcher: Any = None
        self._caught: list[warnings.WarningMessage] = []
        self._previous_event: Any = None

    def before_fetch(self, step: int) -> None:
        if step == 0:
            return
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        set_sync_mode(self.device, "warn")

    def after_fetch(self, step: int, batch: Any) -> None:
        if step == 0:
            return
        self.close()
        self.result.loader_syncs += [
            str(w.message).splitlines()[0] for w in self._caught if "synchroniz" in str(w.message).lower()
        ]

    def before_step(self, step: int, batch: Any) -> None:
        if step == 0:
            return
        self.in_step = True
        set_sync_mode(self.device, "error")

    def after_step(self, step: int, result: Any) -> None:
        set_sync_mode(self.device, "default")
        self.in_step = False
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            if step >= 2 and self._previous_event is not None:
                self.result.queued_ahead.append(not self._previous_event.query())
            self._previous_event = event
        if step > 0:
            self.result.steps_checked += 1

    def at_log_point(self, step: int, record: dict[str, Any]) -> None:
        self.result.log_records.append(record)

    def close(self) -> None:
        """Sync mode back to default and warnings back as they were (also after an error mid-fetch)."""
        set_sync_mode(self.device, "default")
        if self._catcher is not None:
            self._catcher.__exit__(None, None, None)
            self._catcher = None


def hot_loop_check(
    shards: Path,
    out_dir: Path,
    *,
    arch: str,
    image_size: int,
    batch_size: int,
    steps: int,
    workers: int,
    backend: str = "auto",
    device: torch.device | None = None,
) -> HotLoopResult:
    """Train ``steps`` steps with the real ``Trainer`` (graphs on), observed by ``HotLoopProbe``."""
    device = device or default_device()
    from engine.config import build_config
    from engine.distributed import DistInfo
    from engine.trainer import Trainer

    values = {
        "data.root": str(shards),
        "data.train_split": "bench",
        "data.eval_split": "bench",
        "data.backend": backend,
        "data.augment": True,
        "data.image_size_px": image_size,
        "data.num_workers": workers,
        "arch": arch,
        "method.name": "mile",
        # whole teacher/student cycles within the steps (10 + 5 at the check's 30), so the probe sees
        # both phases and their switches, and the run ends on an imitation phase as MILe runs must
        "method.warmup_steps": 0,
        "method.k_teacher_steps": max(1, steps // 3),
        "method.k_student_steps": max(1, steps // 6),
        "num_steps": steps,
        "global_batch_size": batch_size,
        "log_every": steps,
        "eval_every": steps,
        "checkpoint_every": steps,
        "out_dir": str(out_dir),
        "device": str(device),
        "seed": 0,
    }
    trainer = Trainer(build_config({}, values), DistInfo(0, 1, 0, device))
    result = HotLoopResult()
    probe = HotLoopProbe(result, device)
    trainer.observe(probe)
    start = time.perf_counter()
    try:
        trainer.run()
    except RuntimeError as error:
        if not probe.in_step:
            raise
        result.engine_sync_error = str(error).splitlines()[0]
    finally:
        probe.close()
    result.seconds = time.perf_counter() - start
    return result


@app.command("hot-loop")
def check_hot_loop(
    out: Path = OUT_OPTION,
    arch: str = "resnet50",
    image_size: int = 224,
    batch_size: int = 128,
    steps: int = 30,
    workers: int = 8,
    num_images: int = 512,
) -> None:
    """G3: no host sync in the real Trainer's fetches and step enqueues, and the host runs ahead of the device."""

    def body() -> tuple[bool | None, str, dict[str, Any]]:
        if skip := no_cuda():
            return skip
        with tempfile.TemporaryDirectory(prefix="gpu-hot-loop-") as tmp:
            shards = photo_shards(Path(tmp), num_images, num_classes=100)
            result = hot_loop_check(
                shards,
                Path(tmp) / "run",
                arch=arch,
                image_size=image_size,
                batch_size=batch_size,
                steps=steps,
                workers=workers,
            )
        passed = (
            result.engine_sync_error is None
            and not result.loader_syncs
            and result.steps_checked == steps - 1
            and result.run_ahead_fraction >= RUN_AHEAD_FRACTION_MIN
        )
        last = result.log_records[-1] if result.log_records else {}
        summary = (
            f"{result.steps_checked} steps probed; engine sync: {result.engine_sync_error or 'none'}; "
            f"loader syncs: {len(result.loader_syncs)}; step N queued before step N-1 finished in "
            f"{result.run_ahead_fraction:.0%} of steps (>= {RUN_AHEAD_FRACTION_MIN:.0%} needed); trainer's log: "
            f"{last.get('images_per_s', math.nan):.0f} images/s over {last.get('train_seconds', math.nan):.2f} s, "
            f"data wait {last.get('data_wait_s', math.nan):.2f} s"
        )
        return passed, summary, {"result": {**asdict(result), "run_ahead_fraction": result.run_ahead_fraction}}

    guarded("G3", "hot-loop", out, body)


# -- G4 the end-to-end matrix -------------------------------------------------------------------------


@app.command("e2e")
def check_e2e(
    out: Path = OUT_OPTION,
    arch: str = "resnet50",
    image_size: int = 224,
    batch_size: int = 256,
    steps: int = E2E_TIMED_STEPS,
    warmup: int = E2E_WARMUP_STEPS,
    workers: int = 12,
    num_images: int = 1024,
) -> None:
    """G4: ``bench.py e2e``'s rows; PASS when every row was measured (baseline included).

    Each row times ``E2E_TIMED_STEPS`` steps after ``E2E_WARMUP_STEPS`` untimed ones: the warm-up
    takes more batches than any loader holds prefetched (the PIL DataLoader: 12 workers x 2), so
    the timed steps are not served from batches made before the timer started."""

    def body() -> tuple[bool | None, str, dict[str, Any]]:
        if skip := no_cuda():
            return skip
        from benchmarks import e2e
        from benchmarks.loaders import environment as bench_environment

        config = e2e.E2EConfig(arch, image_size, batch_size, 1000, num_images, steps, warmup, workers)
        env = bench_environment()
        rows = e2e.run_e2e_bench(config)
        print(e2e.format_table(rows))
        out.mkdir(parents=True, exist_ok=True)
        e2e.write_json(out / "G4-e2e-table.json", config, rows, env)
        (out / "G4-e2e-table.txt").write_text(e2e.format_table(rows) + "\n")
        failed = [f"{r.group}/{r.name}: {r.error}" for r in rows if r.error]
        groups = {r.group for r in rows if not r.error}
        missing = [g for g in (e2e.LOADER, e2e.ENGINE, e2e.SWITCH, e2e.END_TO_END, e2e.BASELINE) if g not in groups]
        graphed = any("(graphs)" in r.name for r in rows if r.group == e2e.END_TO_END and not r.error)
        summary = (
            f"{len(rows)} rows of {steps} timed steps after {warmup}; failed: {failed or 'none'}; "
            f"groups missing: {missing or 'none'}; graphed end to end: {graphed}"
        )
        return not failed and not missing and graphed, summary, {"speedups": _speedups(rows)}

    guarded("G4", "e2e", out, body)


def _speedups(rows: list[Any]) -> dict[str, float]:
    """Each end-to-end row's images/s over the released-code baseline's."""
    from benchmarks import e2e

    base = [r.images_per_s for r in rows if r.group == e2e.BASELINE and r.images_per_s]
    if not base:
        return {}
    return {r.name: r.images_per_s / base[0] for r in rows if r.group == e2e.END_TO_END and r.images_per_s}


# -- G5 the phase switch ----------------------------------------------------------------------------------


def switch_timings(
    arch: str, batch_size: int, image_size: int, repeats: int, device: torch.device | None = None
) -> dict[str, Any]:
    """Per action: device ms (CUDA events), host ms (enqueue only), bytes copied; allocation growth and
    host syncs of the actions; and the released code's ``deepcopy`` teacher for comparison."""
    import copy

    from benchmarks.engine_steps import Timer
    from engine.build import EngineSpec, build_engine
    from engine.config import build_config
    from engine.phases import PhaseAction

    device = device or default_device()
    config = build_config(
        {},
        {
            "arch": arch,
            "method.name": "mile",
            "method.student_init": "previous",
            "cuda_graphs": False,
            "global_batch_size": batch_size,
            "data.image_size_px": image_size,
            "device": str(device),
        },
    )
    engine = build_engine(config, EngineSpec(1000), device)
    timer, switch, actions = Timer(device), engine.switch, list(PhaseAction)
    switch.apply((PhaseAction.SAVE_STUDENT,))  # allocates the saved-student mirror, once
    allocated = _allocated(device)
    results = {}
    for action in actions:

        def apply(action: PhaseAction = action) -> None:
            switch.apply((action,))

        device_ms = [1000 * timer.seconds(apply) for _ in range(repeats)]
        host_ms = [1000 * _host_seconds(apply) for _ in range(repeats)]
        tensors = switch.teacher_state if action is PhaseAction.SNAPSHOT_TEACHER else switch.student_state
        results[action.value] = {
            "device_ms": statistics.median(device_ms),
            "host_ms": statistics.median(host_ms),
            "bytes": sum(t.numel() * t.element_size() for t in tensors),
            "tensors": len(tensors),
        }
    growth = _allocated(device) - allocated

    def apply_each() -> None:
        for action in actions:
            switch.apply((action,))

    sync_error = _first_sync_error(device, apply_each)
    deepcopy_ms = [1000 * timer.seconds(lambda: copy.deepcopy(engine.learner)) for _ in range(repeats)]
    return {
        "actions": results,
        "allocated_bytes_growth": growth,
        "sync_error": sync_error,
        "deepcopy_ms": statistics.median(deepcopy_ms),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def _host_seconds(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _first_sync_error(device: torch.device, action: Callable[[], Any]) -> str | None:
    """``action`` under ``set_sync_debug_mode("error")``: the error a host sync raised, or None."""
    set_sync_mode(device, "error")
    try:
        action()
    except RuntimeError as error:
        return str(error)
    finally:
        set_sync_mode(device, "default")
    return None


@app.command("switch")
def check_switch(out: Path = OUT_OPTION, arch: str = "resnet50", repeats: int = 10) -> None:
    """G5: the phase switch's device time; no allocation, no host sync, faster than a deepcopy teacher."""

    def body() -> tuple[bool | None, str, dict[str, Any]]:
        if skip := no_cuda():
            return skip
        timings = switch_timings(arch, 256, 224, repeats)
        snapshot = timings["actions"]["snapshot_teacher"]
        passed = (
            timings["sync_error"] is None
            and timings["allocated_bytes_growth"] == 0
            and snapshot["device_ms"] < timings["deepcopy_ms"]
        )
        # time and bytes, no GB/s: a few hundred small tensors make the copy launch-bound, not a bandwidth
        summary = (
            f"snapshot {snapshot['device_ms']:.3f} ms on device for {snapshot['bytes'] / 2**20:.1f} MiB in "
            f"{snapshot['tensors']} tensors, host {snapshot['host_ms']:.3f} ms; "
            + ", ".join(
                f"{k} {v['device_ms']:.3f} ms" for k, v in timings["actions"].items() if k != "snapshot_teacher"
            )
            + f"; deepcopy teacher {timings['deepcopy_ms']:.3f} ms; allocation growth "
            f"{timings['allocated_bytes_growth']} B; sync: {timings['sync_error'] or 'none'}"
        )
        return passed, summary, {"timings": timings}

    guarded("G5", "switch", out, body)


# -- G6 decode parity ----------------------------------------------------------------------------------------


def compare_loaders(reference: Any, candidate: Any, std: tuple[float, ...]) -> dict[str, Any]:
    """Batch by batch: mean and max absolute pixel difference (in [0, 1] units), labels, strides."""
    scale = torch.tensor(std).view(1, 3, 1, 1)
    diffs, maxima, labels_equal, channels_last, batches = [], [], True, True, 0
    for ref, cand in zip(reference.epoch(0), candidate.epoch(0), strict=True):
        images = cand.images.float().cpu()
        pixel_diff = ((images - ref.images.float().cpu()) * scale).abs()
        diffs.append(float(pixel_diff.mean()))
        maxima.append(float(pixel_diff.max()))
        labels_equal &= torch.equal(ref.labels.cpu(), cand.labels.cpu())
        channels_last &= (
            cand.images.is_contiguous(memory_format=torch.channels_last) and cand.images.stride() == ref.images.stride()
        )
        batches += 1
    return {
        "batches": batches,
        "mean_abs_diff": statistics.fmean(diffs) if diffs else math.nan,
        "max_abs_diff": max(maxima, default=math.nan),
        "labels_equal": labels_equal,
        "channels_last": channels_last,
    }


def decode_pairs(
    shards: Path, batch_size: int, image_size: int, device: torch.device | None = None
) -> dict[str, tuple[Any, Any, Any]]:
    """(CPU loader, ``device`` loader, std) pairs to compare, by name."""
    from pipelines import build_loader, dali_import_error
    from pipelines.contract import LoaderConfig

    def loader(backend: str, device: str, train: bool) -> Any:
        config = LoaderConfig(
            batch_size=batch_size, image_size_px=image_size, train=train, backend=backend, num_workers=2, device=device
        )
        return build_loader(shards, "bench", config)

    target = str(device or default_device())
    modes = (("eval", False), ("train", True))  # train: the torch backend seeds each sample's crop, so both crop alike
    pairs = {
        f"torch backend {mode}": (loader("torch", "cpu", train), loader("torch", target, train))
        for mode, train in modes
    }
    if dali_import_error() is None:  # DALI's random crops differ between its CPU and GPU pipelines: eval only
        pairs["DALI eval"] = (loader("dali", "cpu", False), loader("dali", target, False))
    std = LoaderConfig().std
    return {name: (cpu, gpu, std) for name, (cpu, gpu) in pairs.items()}


@app.command("decode")
def check_decode(out: Path = OUT_OPTION, num_images: int = 96, batch_size: int = 32, image_size: int = 224) -> None:
    """G6: GPU decode equals CPU decode to within 1/255 on average; labels equal; channels-last."""

    def body() -> tuple[bool | None, str, dict[str, Any]]:
        if skip := no_cuda():
            return skip
        with tempfile.TemporaryDirectory(prefix="gpu-decode-") as tmp:
            shards = photo_shards(Path(tmp), num_images, num_classes=10)
            results = {}
            for name, (cpu, gpu, std) in decode_pairs(shards, batch_size, image_size).items():
                results[name] = compare_loaders(cpu, gpu, std)
                cpu.close()
                gpu.close()
        passed = all(
            r["batches"] > 0 and r["mean_abs_diff"] < PIXEL_TOLERANCE and r["labels_equal"] and r["channels_last"]
            for r in results.values()
        )
        summary = "; ".join(
            f"{k}: mean |diff| {v['mean_abs_diff'] * 255:.3f}/255, max {v['max_abs_diff'] * 255:.1f}/255, labels "
            f"{'equal' if v['labels_equal'] else 'DIFFER'}, "
            f"{'channels-last' if v['channels_last'] else 'WRONG STRIDES'}"
            for k, v in results.items()
        )
        return passed, summary, {"results": results, "tolerance": PIXEL_TOLERANCE}

    guarded("G6", "decode", out, body)


# -- G2 / G7 DALI ---------------------------------------------------------------------------------------------


def dali_loader(
    shards: Path, batch_size: int, image_size: int, dtype: torch.dtype, device: torch.device | None = None
) -> Any:
    from pipelines import build_loader
    from pipelines.contract import LoaderConfig

    config = LoaderConfig(
        batch_size=batch_size,
        image_size_px=image_size,
        train=True,
        backend="dali",
        num_workers=4,
        device=str(device or default_device()),
        dtype=dtype,
    )
    return build_loader(shards, "bench", config)


def dali_lifetime(shards: Path, batches: int, dtype: torch.dtype, device: torch.device | None = None) -> dict[str, Any]:
    """Three passes over the same epoch of one DALI training loader (its batches depend on (seed,
    epoch, rank) alone): two synchronising after every fetch (the reference, and the control that
    the epoch repeats), and one with the device held busy by a sleep kernel queued before every
    fetch, batches held ``RUN_AHEAD_STEPS + 1`` fetches as the trainer holds them, so that each
    cast (bf16) or copy of DALI's buffers runs long after the fetch returned, while DALI goes on
    producing. The stalled pass must give the reference's batches bit for bit."""
    from engine.steps import RUN_AHEAD_STEPS

    device = device or default_device()
    loader = dali_loader(shards, 16, 224, dtype, device)

    def synchronised() -> list[tuple[torch.Tensor, torch.Tensor]]:
        taken = []
        for _, batch in zip(range(batches), loader.epoch(0)):
            _synchronize(device)
            taken.append((batch.images.float().cpu(), batch.labels.cpu()))
        return taken

    def stalled() -> list[tuple[torch.Tensor, torch.Tensor]]:
        held: list[Any] = []
        copies = []
        for _, batch in zip(range(batches), loader.epoch(0)):
            held = [*held, batch][-(RUN_AHEAD_STEPS + 1) :]
            copies.append((batch.images.clone(), batch.labels.clone()))  # queued behind the sleep
            if device.type == "cuda":
                torch.cuda._sleep(STALL_CYCLES)  # the device busy for a while before the next fetch's work
        _synchronize(device)
        return [(images.float().cpu(), labels.cpu()) for images, labels in copies]

    try:
        reference, control, stalled_pass = synchronised(), synchronised(), stalled()
    finally:
        loader.close()

    def differing(a: list[Any], b: list[Any]) -> list[int]:
        return [i for i, (x, y) in enumerate(zip(a, b)) if not (torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]))]

    return {
        "batches": min(len(reference), len(stalled_pass)),
        "repeatable": len(reference) == len(control) and not differing(reference, control),
        "changed": differing(reference, stalled_pass),
    }


@app.command("dali-lifetime")
def check_dali_lifetime(out: Path = OUT_OPTION, batches: int = 12) -> None:
    """G2: DALI's buffers outlive the device work queued on them, on the bf16 path (casts) and float32."""

    def body() -> tuple[bool | None, str, dict[str, Any]]:
        if skip := no_cuda() or dali_missing():
            return skip
        results = {}
        with tempfile.TemporaryDirectory(prefix="gpu-dali-") as tmp:
            shards = photo_shards(Path(tmp), 16 * (batches + 1), num_classes=10)
            for dtype in (torch.bfloat16, torch.float32):
                results[str(dtype).removeprefix("torch.")] = dali_lifetime(shards, batches, dtype)
        passed = all(r["batches"] == batches and r["repeatable"] and not r["changed"] for r in results.values())
        summary = "; ".join(
            f"{name}: {r['batches']} batches, stalled pass vs synchronised: changed {r['changed'] or 'none'}"
            f"{'' if r['repeatable'] else ' (two synchronised passes differ: cannot tell)'}"
            for name, r in results.items()
        )
        return passed, summary, {"results": results}

    guarded("G2", "dali-lifetime", out, body)


@app.command("dali-capture")
def check_dali_capture(out: Path = OUT_OPTION, arch: str = "resnet18", steps: int = 8) -> None:
    """G7: capture the steps while a DALI iterator prefetches on its threads, then train on its batches."""

    def body() -> tuple[bool | None, str, dict[str, Any]]:
        if skip := no_cuda() or dali_missing():
            return skip
        from engine.build import EngineSpec, build_engine
        from engine.config import build_config

        with tempfile.TemporaryDirectory(prefix="gpu-dali-") as tmp:
            shards = photo_shards(Path(tmp), 64 * 6, num_classes=10)
            loader = dali_loader(shards, 32, 128, torch.bfloat16)
            stream = loader.epoch(0)
            first = next(stream)  # DALI's threads now prefetch the next batches while we capture
            config = build_config(
                {},
                {
                    "arch": arch,
                    "method.name": "mile",
                    "method.k_teacher_steps": 3,
                    "method.k_student_steps": 2,
                    "global_batch_size": 32,
                    "data.image_size_px": 128,
                    "device": "cuda",
                },
            )
            engine = build_engine(config, EngineSpec(10), torch.device("cuda", torch.cuda.current_device()))
            reason = engine.capture(first)
            losses = [engine.train_step(step, next(stream)).loss.float().item() for step in range(steps)]
            stream.close()
        finite = all(math.isfinite(x) for x in losses)
        losses_word = "finite" if finite else "NOT finite"
        summary = f"capture: {reason or 'graphed'}; {steps} steps on DALI batches, losses {losses_word}"
        return reason is None and engine.stepper.graphed and finite, summary, {"losses": losses, "reason": reason}

    guarded("G7", "dali-capture", out, body)


# -- G8 captured steps under DDP ------------------------------------------------------------------------------


@contextlib.contextmanager
def single_process_group(device: torch.device) -> Iterator[None]:
    """A process group of one (NCCL on CUDA, gloo on the CPU), initialised from the environment as
    torchrun would, asynchronous error handling off as the CUDA-graph notes on DDP ask; destroyed and
    the environment put back afterwards."""
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCH_NCCL_ASYNC_ERROR_HANDLING")
    saved = {name: os.environ.get(name) for name in names}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ddp_engines(arch: str, image_size: int, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Three engines built alike (same seed: same initial weights): DDP graphed, DDP eager, plain graphed."""
    from engine.build import EngineSpec, build_engine
    from engine.config import build_config

    def config(graphs: bool) -> Any:
        return build_config(
            {},
            {
                "arch": arch,
                "method.name": "mile",
                "method.k_teacher_steps": 3,
                "method.k_student_steps": 2,
                "global_batch_size": batch_size,
                "data.image_size_px": image_size,
                "device": str(device),
                "cuda_graphs": graphs,
                "ddp_bf16_grads": True,  # the compression hook must be captured too
            },
        )

    return {
        "ddp graphed": build_engine(config(True), EngineSpec(10), device, distributed=True),
        "ddp eager": build_engine(config(False), EngineSpec(10), device, distributed=True),
        "plain graphed": build_engine(config(True), EngineSpec(10), device),
    }


def synthetic_batches(
    count: int, batch_size: int, image_size: int, device: torch.device, dtype: torch.dtype
) -> list[Any]:
    from pipelines.contract import Batch

    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device, dtype)
        labels = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
        batches.append(Batch(images.contiguous(memory_format=torch.channels_last), labels))
    return batches


@torch.no_grad()
def _movement_error(before: list[torch.Tensor], graphed: list[torch.Tensor], eager: list[torch.Tensor]) -> float:
    """|graphed - eager| relative to how far the graphed step moved the state (floating tensors)."""
    pairs = [(b, g, e) for b, g, e in zip(before, graphed, eager) if b.is_floating_point()]
    moved = torch.stack([torch.linalg.vector_norm((g - b).float()) for b, g, _ in pairs]).norm()
    apart = torch.stack([torch.linalg.vector_norm((g - e).float()) for _, g, e in pairs]).norm()
    return float(apart / moved.clamp_min(1e-30))  # SYNC: check


def ddp_lockstep_errors(graphed: Any, eager: Any, batches: list[Any]) -> list[float]:
    """Each step from the same state (the eager engine gets the graphed one's weights, statistics,
    momentum and teacher before it): the error of the graphed DDP step against the eager one."""
    errors = []
    for step, batch in enumerate(batches):
        with torch.no_grad():
            torch._foreach_copy_(
                eager.switch.student_state + eager.switch.teacher_state,
                graphed.switch.student_state + graphed.switch.teacher_state,
            )
        before = [t.clone() for t in graphed.switch.student_state]
        graphed.train_step(step, batch)
        eager.train_step(step, batch)
        errors.append(_movement_error(before, graphed.switch.student_state, eager.switch.student_state))
    return errors


def step_ms(engine: Any, batches: list[Any], repeats: int, device: torch.device) -> float:
    """Median over ``repeats`` of the mean time of one step over ``batches`` (device time on CUDA)."""
    from benchmarks.engine_steps import Timer

    timer = Timer(device)

    def steps() -> None:
        for step, batch in enumerate(batches):
            engine.train_step(step, batch)

    steps()  # warm-up
    return statistics.median(timer.seconds(steps) for _ in range(repeats)) / len(batches) * 1000


def ddp_graph_comparison(
    arch: str,
    image_size: int,
    batch_size: int,
    steps: int,
    repeats: int,
    device: torch.device | None = None,
    dump_dir: Path | None = None,
) -> dict[str, Any]:
    """G8's measurements: capture reasons, lockstep errors, step times of the DDP and plain graphed
    engines, the bf16 compression hook's trace in the gradients, and NCCL kernels in captured graphs
    (the DDP steps' graph descriptions and a one-collective probe graph, dumped into ``dump_dir``)."""
    device = device or default_device()
    dump_dir = dump_dir or Path(tempfile.mkdtemp(prefix="gpu-ddp-graphs-"))
    with single_process_group(device):
        engines = ddp_engines(arch, image_size, batch_size, device)
        batches = synthetic_batches(
            steps, batch_size, image_size, device, torch.bfloat16 if device.type == "cuda" else torch.float32
        )
        reasons = {name: engine.capture(batches[0], debug=name == "ddp graphed") for name, engine in engines.items()}
        errors = ddp_lockstep_errors(engines["ddp graphed"], engines["ddp eager"], batches)
        engines["plain graphed"].train_step(0, batches[0])
        inexact = {name: inexact_bf16_fraction(engines[name].learner) for name in ("ddp graphed", "plain graphed")}
        times = {name: step_ms(engines[name], batches, repeats, device) for name in ("ddp graphed", "plain graphed")}
        world_size = torch.distributed.get_world_size()
        nccl: dict[str, int | str | None] = {}
        try:
            nccl[NCCL_PROBE] = nccl_probe_kernels(device, dump_dir / "probe.dot")
        except Exception as error:  # the other measurements still count; the verdict fails on this one
            nccl[NCCL_PROBE] = f"{type(error).__name__}: {error}"
        if reasons["ddp graphed"] is None and device.type == "cuda":
            for phase, step in engines["ddp graphed"].stepper.steps.items():
                step.dump(str(dump_dir / f"ddp-{phase}.dot"))
                nccl[f"DDP {phase} step"] = nccl_kernel_nodes(dump_dir / f"ddp-{phase}.dot")
    return {
        "capture": reasons,
        "errors": errors,
        "step_ms": times,
        "slowdown": times["ddp graphed"] / times["plain graphed"],
        "bf16_inexact_gradient_fraction": inexact,
        "nccl_kernel_nodes": nccl,
        "world_size": world_size,
    }


@torch.no_grad()
def inexact_bf16_fraction(module: torch.nn.Module) -> float:
    """The share of gradient elements that bf16 cannot hold exactly. DDP's bf16 compression hook
    rounds every gradient to bf16 on its way through the all-reduce, so after a replayed DDP step
    that captured the hook it is 0; a step without it keeps fp32 gradients (BatchNorm's, at least)."""
    grads = [p.grad.detach().float().reshape(-1) for p in module.parameters() if p.grad is not None]
    if not grads:
        return math.nan
    flat = torch.cat(grads)
    return float((flat != flat.bfloat16().float()).float().mean())  # SYNC: check


NCCL_PROBE = "probe (one all-reduce, ReduceOp.AVG)"
# NCCL's kernels are named ncclKernel_* / ncclDevKernel_*; a one-rank reduction with a scale is oneRankReduce
NCCL_KERNEL = re.compile(r"nccl\w*kernel|onerankreduce", re.IGNORECASE)


def nccl_kernel_nodes(dot: Path) -> int:
    """Lines of a graph's DOT description (``CUDAGraph.debug_dump``) that name an NCCL kernel."""
    return sum(1 for line in dot.read_text(errors="replace").splitlines() if NCCL_KERNEL.search(line))


def nccl_probe_kernels(device: torch.device, dot: Path) -> int | None:
    """NCCL kernels in a graph capturing one all-reduce on this process group (None off CUDA).

    At world size 1, NCCL enqueues nothing for an in-place sum (``ncclLaunchOneRank`` returns at
    once unless the reduction scales: PreMulSum), so a DDP step's graph can show no NCCL node here
    even when the all-reduce was captured; ``ReduceOp.AVG`` on floats is a PreMulSum, which NCCL
    runs as a kernel even on one rank: its node in the graph shows that NCCL work is captured."""
    if device.type != "cuda":
        return None
    tensor = torch.ones(1 << 16, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.AVG)  # outside capture: NCCL set-up
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    graph.enable_debug_mode()
    with torch.cuda.graph(graph):
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.AVG)
    graph.replay()
    torch.cuda.synchronize(device)
    graph.debug_dump(str(dot))
    return nccl_kernel_nodes(dot)


@app.command("ddp-graphs")
def check_ddp_graphs(
    out: Path = OUT_OPTION,
    arch: str = "resnet18",
    image_size: int = 128,
    batch_size: int = 64,
    steps: int = 20,
    repeats: int = 5,
) -> None:
    """G8: DDP (NCCL) graphed == eager, NCCL and the bf16 compression hook inside the captured step,
    and the captured DDP step within 5% of the non-DDP captured step."""

    def body() -> tuple[bool | None, str, dict[str, Any]]:
        if skip := no_cuda():
            return skip
        with tempfile.TemporaryDirectory(prefix="gpu-ddp-graphs-") as tmp:
            result = ddp_graph_comparison(arch, image_size, batch_size, steps, repeats, dump_dir=Path(tmp))
        errors = result["errors"]
        graphed = result["capture"]["ddp graphed"] is None and result["capture"]["plain graphed"] is None
        median_error, max_error = statistics.median(errors), max(errors)
        inexact, nccl = result["bf16_inexact_gradient_fraction"], result["nccl_kernel_nodes"]
        hook_captured = inexact["ddp graphed"] == 0 and inexact["plain graphed"] > 0
        step_nodes = [count for name, count in nccl.items() if name.startswith("DDP")]
        # world size 1: NCCL enqueues nothing for DDP's in-place sums (see nccl_probe_kernels)
        probe = nccl[NCCL_PROBE]
        nccl_captured = isinstance(probe, int) and probe > 0 and (result["world_size"] == 1 or all(step_nodes))
        passed = (
            graphed
            and median_error <= DDP_ERROR_MEDIAN
            and max_error <= DDP_ERROR_MAX
            and result["slowdown"] <= DDP_SLOWDOWN_MAX
            and hook_captured
            and nccl_captured
        )
        summary = (
            f"capture: {result['capture']}; graphed vs eager DDP over {steps} steps: median error {median_error:.2e} "
            f"(<= {DDP_ERROR_MEDIAN:g}), max {max_error:.2e} (<= {DDP_ERROR_MAX:g}); step "
            f"{result['step_ms']['ddp graphed']:.3f} ms under DDP vs {result['step_ms']['plain graphed']:.3f} ms "
            f"without (x{result['slowdown']:.3f}, <= {DDP_SLOWDOWN_MAX}); gradients bf16-inexact after a replay: "
            f"{inexact['ddp graphed']:.2%} with the hook (0 needed), {inexact['plain graphed']:.2%} without "
            f"(> 0 needed); NCCL kernel nodes: {nccl} at world size {result['world_size']}"
        )
        return passed, summary, {"result": result}

    guarded("G8", "ddp-graphs", out, body)


if __name__ == "__main__":
    app()
