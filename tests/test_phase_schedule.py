"""The MILe phase schedule driven through ``build_engine`` and ``Engine.train_step``, checked step by
step against an independent float64 reference of the method (CPU), with a negative control that
skips one teacher snapshot. The schedule, the lockstep driver and the state comparison live in
``tests/phase_lockstep.py``, which ``tests/test_gpu.py`` uses to compare captured CUDA-graph runs with
eager ones on the same schedule.

The schedule (teacher phase with warm-up, student phase, teacher phase, student phase: T..T,S,S,
T..T,S,S) has two teacher -> student switches and one student -> teacher switch, so it exercises
every phase action: the teacher snapshot, and with ``student_init="previous"`` saving and
restoring the student's weights and momentum. Both ``student_init`` modes are run.

Lockstep. Before every step the reference takes the learner's weights, BatchNorm statistics and
momentum from the engine under test; the teacher and the saved student it keeps itself, made by
its own phase rules. Every step is then one comparison from the same starting point. A free-running
comparison cannot be tight: this training amplifies rounding. Measured: free-running, the float32
engine ended 7% of the weights' movement away from the float64 reference, and a float32 run whose
initial weights were nudged by 1e-7 (relative) drifted as far from the unnudged one; one GPU run
against another is such a nudge too. What the phase rules decide (when the
teacher is snapshotted, which student is saved and put back) is not taken over, so a wrong rule
shows as a teacher or student that differs by whole steps of training.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from phase_lockstep import (
    LR_PER_256,
    MOMENTUM,
    NUM_CLASSES,
    RHO,
    SCHEDULE,
    WEIGHT_DECAY,
    assert_rates_in_bounds,
    assert_skipped_snapshot_caught,
    collect_state,
    engine_momentum,
    initial_state,
    lockstep,
    named_state,
    schedule_batches,
    schedule_engine,
    skip_snapshot,
)
from torch import nn

from engine.build import Engine
from pipelines.contract import Batch

# Errors are relative to how far training moved each tensor from its initial value. float32 engine
# vs float64 reference from the same starting point, measured: one step's rounding is 1e-6..1e-4 of
# the movement (median 2e-6); a few steps show up to 9e-3 in the first layers' momentum, where a
# ReLU or max-pool tie resolves the other way in float64 and routes one gradient term elsewhere.
# A wrong phase rule moves a tensor by whole steps of training: >= 0.3 of its movement (measured).
# So: no step beyond LOOSE (ties pass, rules do not) and the median step within TIGHT (a small
# error at every step, say a missing term in the update, does not pass either).
FLOAT32_TIGHT, FLOAT32_LOOSE = 1e-4, 3e-2


# -- the independent float64 reference -------------------------------------------------------------


class ReferenceMile:
    """MILe's phases in float64, written from the method's description rather than from
    ``engine/phases.py``: plain SGD with momentum and weight decay on every parameter, BCE against
    one-hot labels or against 1[sigmoid(teacher) > rho]; at each teacher -> student switch the
    teacher becomes a deep copy of the learner (eval mode); with ``student_init="previous"`` the
    learner (BatchNorm statistics included) and its momentum are copied when a teacher phase
    begins and put back right after the next snapshot."""

    def __init__(self, initial: nn.Module, student_init: str, lr: float) -> None:
        self.model = copy.deepcopy(initial).double().train()
        self.momentum = {name: torch.zeros_like(p) for name, p in self.model.named_parameters()}
        self.teacher = copy.deepcopy(self.model).eval()
        self.saved: tuple[nn.Module, dict[str, torch.Tensor]] | None = None
        self.previous_init, self.lr = student_init == "previous", lr
        self.previous_phase: str | None = None

    @torch.no_grad()
    def sync_from(self, engine: Engine) -> None:
        ours = named_state(self.model)
        for name, tensor in named_state(engine.learner).items():
            ours[name].copy_(tensor)
        for name, tensor in engine_momentum(engine).items():
            self.momentum[name].copy_(tensor)

    def step(self, step: int, batch: Batch) -> float | None:
        phase = SCHEDULE[step]
        if phase == "S" and self.previous_phase == "T":
            self.teacher = copy.deepcopy(self.model).eval()
            if self.previous_init:
                assert self.saved is not None  # saved when the teacher phase began
                self.model, self.momentum = copy.deepcopy(self.saved[0]), copy.deepcopy(self.saved[1])
        if phase == "T" and self.previous_phase != "T" and self.previous_init:
            self.saved = (copy.deepcopy(self.model), copy.deepcopy(self.momentum))
        self.previous_phase = phase
        images, rate = batch.images.double(), None
        if phase == "T":
            targets = F.one_hot(batch.labels, NUM_CLASSES).double()
        else:
            with torch.no_grad():
                targets = (torch.sigmoid(self.teacher(images)) > RHO).double()
            rate = float(targets.mean())
        self._sgd_step(images, targets)
        return rate

    def _sgd_step(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        loss = F.binary_cross_entropy_with_logits(self.model(images), targets, reduction="sum") / images.shape[0]
        params = dict(self.model.named_parameters())
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for (name, p), grad in zip(params.items(), grads):
                buffer = self.momentum[name]
                buffer.mul_(MOMENTUM).add_(grad + WEIGHT_DECAY * p)
                p.sub_(self.lr * buffer)

    def state(self) -> dict[str, torch.Tensor]:
        saved = None
        if self.saved is not None:
            saved = {**named_state(self.saved[0]), **{f"momentum:{k}": v for k, v in self.saved[1].items()}}
        return collect_state(self.model, self.momentum, self.teacher, saved)


# -- the CPU test ---------------------------------------------------------------------------------

CPU_SETTINGS: dict[str, Any] = {"arch": "grid_cnn", "batch_size": 16, "image_size": 24}


@pytest.fixture(scope="module")
def cpu_batches() -> list[Batch]:
    return schedule_batches(CPU_SETTINGS["batch_size"], CPU_SETTINGS["image_size"], "cpu", torch.float32)


def reference_for(engine: Engine, student_init: str) -> ReferenceMile:
    return ReferenceMile(engine.learner, student_init, lr=LR_PER_256 * CPU_SETTINGS["batch_size"] / 256)


@pytest.mark.parametrize("student_init", ["teacher", "previous"])
def test_engine_schedule_matches_float64_reference(student_init: str, cpu_batches: list[Batch]) -> None:
    engine = schedule_engine(student_init, "cpu", **CPU_SETTINGS)
    initial = initial_state(engine.learner, with_saved_student=student_init == "previous")
    result = lockstep(engine, reference_for(engine, student_init), cpu_batches, initial)
    assert_rates_in_bounds(result.rates)
    assert result.rates == pytest.approx(result.twin_rates, abs=1e-6), (
        "the engine's pseudo-labels differ from the reference's"
    )
    failures = result.failures(FLOAT32_TIGHT, FLOAT32_LOOSE)
    assert not failures, failures[:10]


@pytest.mark.parametrize("student_init", ["teacher", "previous"])
def test_skipped_teacher_snapshot_is_caught_on_cpu(student_init: str, cpu_batches: list[Batch]) -> None:
    """Negative control: the same comparison must fail for a run that skips the second snapshot."""
    engine = schedule_engine(student_init, "cpu", **CPU_SETTINGS)
    initial = initial_state(engine.learner, with_saved_student=student_init == "previous")
    skip_snapshot(engine, 2)
    result = lockstep(engine, reference_for(engine, student_init), cpu_batches, initial)
    assert_skipped_snapshot_caught(result, FLOAT32_TIGHT, FLOAT32_LOOSE)
