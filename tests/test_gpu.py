"""GPU-only checks (marked ``gpu``, skipped without CUDA): captured steps equal eager ones over the
MILe phase schedule (and a run that skips a teacher snapshot is caught), and neither
``Engine.train_step`` nor the real ``Trainer`` loop synchronises the host with the device.

The schedule, the synthetic batches, the state comparison and the lockstep driver are those of
``tests/phase_lockstep.py``, which ``tests/test_phase_schedule.py`` uses too (it checks the same
schedule on the CPU against a float64 reference); here the graphed engine is run in lockstep with an
eager one built alike.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from phase_lockstep import (
    SCHEDULE,
    Lockstep,
    assert_rates_in_bounds,
    assert_skipped_snapshot_caught,
    engine_state,
    initial_state,
    lockstep,
    relative_errors,
    schedule_batches,
    schedule_engine,
    skip_snapshot,
    teacher_positive_rate,
)

from engine.build import Engine
from engine.phases import STUDENT
from engine.steps import RunAheadLimit
from engine.trainer import TrainStats
from pipelines.contract import Batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Graphed vs eager bf16 runs, errors relative to each tensor's movement, one step at a time from the
# same state. Both run the same kernels (cuDNN's benchmark choices are cached per process, so both
# engines get the same algorithms); what differs is the order of nondeterministic fp32 reductions
# (~1e-6 of a gradient) and, rarely, a bf16 rounding or a pseudo-label that flips with it. The median
# step must stay within a quarter of a bf16 ulp (2^-8) of the movement; no step may exceed 5e-2,
# which a single flipped rounding stays under and a skipped snapshot (>= 0.3) does not.
BF16_TIGHT, BF16_LOOSE = 1e-3, 5e-2
SETTINGS = {
    "grid_cnn": {"arch": "grid_cnn", "batch_size": 16, "image_size": 24},  # the CPU test's model and data
    "resnet18": {"arch": "resnet18", "batch_size": 16, "image_size": 32},  # cuDNN convolutions, residual adds
}


class EagerTwin:
    """An eager engine stepping alongside the graphed one, from the learner state it is given."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @torch.no_grad()
    def sync_from(self, engine: Engine) -> None:
        torch._foreach_copy_(
            self.engine.switch.student_state, engine.switch.student_state
        )  # weights, BN statistics, momentum

    def step(self, step: int, batch: Batch) -> float | None:
        self.engine.train_step(step, batch)
        return (
            teacher_positive_rate(self.engine, batch.images)
            if self.engine.plan.position(step).phase is STUDENT
            else None
        )

    def state(self) -> dict[str, torch.Tensor]:
        return engine_state(self.engine)


def graphed_and_eager(student_init: str, settings: dict, batches: list[Batch]) -> tuple[Engine, Engine]:
    graphed = schedule_engine(student_init, "cuda", graphs=True, **settings)
    eager = schedule_engine(student_init, "cuda", graphs=False, **settings)
    assert torch.backends.cudnn.benchmark, "the engine turns cudnn.benchmark on for CUDA runs"
    assert graphed.capture(batches[0]) is None and graphed.stepper.graphed
    assert eager.capture(batches[0]) is not None and not eager.stepper.graphed
    return graphed, eager


def run_pair(student_init: str, settings: dict, skip: int | None = None) -> tuple[Lockstep, dict[str, float]]:
    batches = schedule_batches(settings["batch_size"], settings["image_size"], "cuda", torch.bfloat16)
    graphed, eager = graphed_and_eager(student_init, settings, batches)
    initial = initial_state(graphed.learner, with_saved_student=student_init == "previous")
    start = relative_errors(engine_state(graphed), engine_state(eager), initial)
    if skip is not None:
        skip_snapshot(graphed, skip)
    return lockstep(graphed, EagerTwin(eager), batches, initial), start


@pytest.mark.parametrize("arch", sorted(SETTINGS))
@pytest.mark.parametrize("student_init", ["teacher", "previous"])
def test_graph_steps_equal_eager_steps(student_init: str, arch: str) -> None:
    result, start = run_pair(student_init, SETTINGS[arch])
    assert max(start.values()) == 0.0, (
        "graphed and eager engines must start from the same weights (capture restores them)"
    )
    assert_rates_in_bounds(result.rates)
    assert result.rates == pytest.approx(result.twin_rates, abs=1e-6), "pseudo-labels differ between graphed and eager"
    failures = result.failures(BF16_TIGHT, BF16_LOOSE)
    assert not failures, failures[:10]


@pytest.mark.parametrize("student_init", ["teacher", "previous"])
def test_skipped_snapshot_in_graphed_run_is_caught(student_init: str) -> None:
    """Negative control: the comparison above must fail for a graphed run that skips a snapshot."""
    result, _ = run_pair(student_init, SETTINGS["grid_cnn"], skip=2)
    assert_skipped_snapshot_caught(result, BF16_TIGHT, BF16_LOOSE)


@pytest.mark.parametrize("graphs", [True, False])
def test_train_step_has_no_host_sync(graphs: bool) -> None:
    """The whole per-step protocol (phase actions, learning rate, step, statistics, run-ahead ring)
    over the schedule, every phase action included (student_init previous)."""
    settings = SETTINGS["grid_cnn"]
    batches = schedule_batches(settings["batch_size"], settings["image_size"], "cuda", torch.bfloat16)
    engine = schedule_engine("previous", "cuda", graphs=graphs, **settings)
    engine.capture(batches[0])
    assert engine.stepper.graphed == graphs
    device = engine.device
    stats, ring = TrainStats(device), RunAheadLimit(device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        for step, batch in enumerate(batches):
            ring.wait_turn()
            result = engine.train_step(step, batch)
            stats.update(result, batch.labels, step)
            ring.step_queued(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.first_bad() == -1 and stats.num_steps == len(SCHEDULE)


def test_trainer_hot_loop_has_no_host_sync() -> None:
    """The real Trainer (torch loader with nvJPEG decode, graphs on): no sync in the engine's part of
    any step, none reported from the rest of the step (the loader) either."""
    from benchmarks.gpu_checks import hot_loop_check, photo_shards

    with tempfile.TemporaryDirectory(prefix="gpu-test-hot-loop-") as tmp:
        shards = photo_shards(Path(tmp), 64, num_classes=10)
        result = hot_loop_check(
            shards,
            Path(tmp) / "run",
            arch="grid_cnn",
            image_size=32,
            batch_size=16,
            steps=12,
            workers=2,
            backend="torch",
        )
    assert result.engine_sync_error is None, result.engine_sync_error
    assert not result.loader_syncs, result.loader_syncs[:5]
    assert result.steps_checked == 11
