"""The MILe phase schedule driven through ``build_engine`` and ``Engine.train_step`` one step at a
time in lockstep with a twin (the float64 reference of ``tests/test_phase_schedule.py`` on the CPU, an
eager engine in ``tests/test_gpu.py``), and the comparison of their states. The schedule and the
lockstep method are described in ``tests/test_phase_schedule.py``."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from engine.build import Engine, EngineSpec, build_engine
from engine.config import build_config
from engine.losses import logit
from engine.phases import STUDENT, PhaseAction
from engine.steps import autocast_context
from pipelines.contract import Batch

# T x16, S x2, T x14, S x2. Teacher phases this long train a teacher that tells the classes apart,
# so its pseudo-labels are mostly the label plus a few others; with one-step teacher phases it is
# barely trained, its outputs are near-constant per class and the positive rate swings from 0 to
# whole classes (measured on this data).
WARMUP_STEPS = 2
K_TEACHER = 14
K_STUDENT = 2
SCHEDULE = "T" * (WARMUP_STEPS + K_TEACHER) + "S" * K_STUDENT + "T" * K_TEACHER + "S" * K_STUDENT
NUM_CLASSES = 10
PATTERN_SCALE = 2.0  # class pattern vs unit noise in the synthetic images: a task learnt in a few steps
RHO = 0.3
LR_PER_256 = 1.6
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
POSITIVE_RATE_BOUNDS = (0.01, 0.5)  # pseudo-labels neither all 0 nor mostly 1: the student steps test something


# -- the schedule through the engine (shared with tests/test_gpu.py) -------------------------------


def schedule_engine(
    student_init: str, device: str, *, arch: str, batch_size: int, image_size: int, graphs: bool = False
) -> Engine:
    values = {
        "arch": arch,
        "method.name": "mile",
        "method.warmup_steps": WARMUP_STEPS,
        "method.k_teacher_steps": K_TEACHER,
        "method.k_student_steps": K_STUDENT,
        "method.student_init": student_init,
        "method.rho": RHO,
        "num_steps": len(SCHEDULE),
        "global_batch_size": batch_size,
        "data.image_size_px": image_size,
        "optim.schedule": "constant",
        "optim.lr_per_256": LR_PER_256,
        "optim.momentum": MOMENTUM,
        "optim.weight_decay": WEIGHT_DECAY,
        "device": device,
        "cuda_graphs": graphs,
    }
    engine = build_engine(build_config({}, values), EngineSpec(NUM_CLASSES), torch.device(device))
    phases = "".join("S" if engine.plan.position(step).phase is STUDENT else "T" for step in range(len(SCHEDULE)))
    assert phases == SCHEDULE, f"the config gives phases {phases}, not {SCHEDULE}"
    return engine


def schedule_batches(batch_size: int, image_size: int, device: str, dtype: torch.dtype, seed: int = 1) -> list[Batch]:
    """One batch per step, channels-last as the loaders give it: noise plus a fixed pattern per
    class, so that a few teacher steps already tell the classes apart."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(NUM_CLASSES, 3, image_size, image_size, generator=generator)
    batches = []
    for _ in SCHEDULE:
        labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
        images = (
            torch.randn(batch_size, 3, image_size, image_size, generator=generator) + PATTERN_SCALE * patterns[labels]
        )
        images = images.to(device, dtype).contiguous(memory_format=torch.channels_last)
        batches.append(Batch(images, labels.to(device)))
    return batches


def teacher_positive_rate(engine: Engine, images: torch.Tensor) -> float:
    """Share of the teacher's outputs above the pseudo-label threshold, as the student step sees them."""
    assert engine.teacher is not None  # a MILe engine
    with torch.no_grad(), autocast_context(engine.settings.autocast_dtype, engine.device.type):
        logits = engine.teacher(images).float()
    return float((logits > logit(engine.config.method.rho)).float().mean())


def skip_snapshot(engine: Engine, which: int) -> None:
    """Make ``engine`` leave out its ``which``-th teacher snapshot (1-based): the negative control."""
    apply, seen = engine.switch.apply, [0]

    def apply_but_skip(actions: tuple[PhaseAction, ...]) -> None:
        if PhaseAction.SNAPSHOT_TEACHER in actions:
            seen[0] += 1
            if seen[0] == which:
                actions = tuple(a for a in actions if a is not PhaseAction.SNAPSHOT_TEACHER)
        apply(actions)

    engine.switch.apply = apply_but_skip  # type: ignore[method-assign]  # the fault under test


# -- states and their comparison (shared with tests/test_gpu.py) ------------------------------------


def named_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters then buffers (the order of ``engine.phases.module_state``), by name."""
    params = {f"param:{name}": p.detach() for name, p in model.named_parameters()}
    return {**params, **{f"buffer:{name}": b for name, b in model.named_buffers()}}


def collect_state(
    learner: nn.Module,
    momentum: dict[str, torch.Tensor],
    teacher: nn.Module,
    saved_student: dict[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """Copies of everything the schedule changes, floats as float64: learner, momentum, teacher,
    and the saved student of ``student_init="previous"``."""
    state = {f"learner/{k}": v for k, v in named_state(learner).items()}
    state.update({f"momentum/{k}": v for k, v in momentum.items()})
    state.update({f"teacher/{k}": v for k, v in named_state(teacher).items()})
    if saved_student is not None:
        state.update({f"saved_student/{k}": v for k, v in saved_student.items()})
    return {k: v.detach().double() if v.is_floating_point() else v.detach().clone() for k, v in state.items()}


def engine_momentum(engine: Engine) -> dict[str, torch.Tensor]:
    return {name: engine.optimizer.state[p]["momentum_buffer"] for name, p in engine.learner.named_parameters()}


def engine_state(engine: Engine) -> dict[str, torch.Tensor]:
    learner = engine.learner
    saved = None
    if engine.switch.saved_student is not None:
        names = list(named_state(learner)) + [f"momentum:{name}" for name, _ in learner.named_parameters()]
        saved = dict(zip(names, engine.switch.saved_student.tensors, strict=True))
    assert engine.teacher is not None  # a MILe engine
    return collect_state(learner, engine_momentum(engine), engine.teacher, saved)


def initial_state(learner: nn.Module, with_saved_student: bool) -> dict[str, torch.Tensor]:
    """The state before step 0: teacher = learner, momentum zero (what movement is measured from)."""
    zeros = {name: torch.zeros_like(p) for name, p in learner.named_parameters()}
    saved = {**named_state(learner), **{f"momentum:{k}": v for k, v in zeros.items()}} if with_saved_student else None
    return collect_state(learner, zeros, learner, saved)


def relative_errors(
    ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> dict[str, float]:
    """|ours - reference| / |reference - initial| per tensor (norms over the tensor): relative to how
    far training moved it, so that small tensors and large ones count alike. Integer tensors
    (BatchNorm batch counts) must be equal: 0 or infinity."""
    assert ours.keys() == reference.keys(), sorted(set(ours) ^ set(reference))
    errors = {}
    for name, ref in reference.items():
        got = ours[name]
        if not ref.is_floating_point():
            errors[name] = 0.0 if torch.equal(got, ref) else float("inf")
            continue
        moved = float((ref - initial[name]).norm()) + 1e-6 * float(ref.norm()) + 1e-12
        errors[name] = float((got - ref).norm()) / moved
    return errors


# -- lockstep runs (shared with tests/test_gpu.py) ---------------------------------------------------


class Twin(Protocol):
    """What the engine under test is run against: takes the learner's state, steps, reports its state."""

    def sync_from(self, engine: Engine) -> None: ...

    def step(self, step: int, batch: Batch) -> float | None: ...  # the positive rate at student steps

    def state(self) -> dict[str, torch.Tensor]: ...


@dataclass
class Lockstep:
    rates: list[float]  # the engine's teacher positive rate at each student step
    twin_rates: list[float | None]
    errors: list[dict[str, float]]  # per step: relative error of every tensor

    def failures(self, tight: float, loose: float) -> list[str]:
        """Steps with a tensor beyond ``loose``, and a median step worse than ``tight``."""
        out = [
            f"step {i}: {name} off by {e:.2g} of its movement"
            for i, step in enumerate(self.errors)
            for name, e in step.items()
            if e > loose
        ]
        worst = [max(step.values()) for step in self.errors]
        if statistics.median(worst) > tight:
            out.append(f"median step's worst error {statistics.median(worst):.2g} > {tight:g}")
        return out


def lockstep(ours: Engine, twin: Twin, batches: list[Batch], initial: dict[str, torch.Tensor]) -> Lockstep:
    """Both sides step from the same learner state; every tensor is compared after every step."""
    result = Lockstep([], [], [])
    for step, batch in enumerate(batches):
        twin.sync_from(ours)
        twin_rate = twin.step(step, batch)
        ours.train_step(step, batch)
        if ours.plan.position(step).phase is STUDENT:
            result.rates.append(teacher_positive_rate(ours, batch.images))
            result.twin_rates.append(twin_rate)
        result.errors.append(relative_errors(engine_state(ours), twin.state(), initial))
    return result


def assert_rates_in_bounds(rates: list[float]) -> None:
    low, high = POSITIVE_RATE_BOUNDS
    assert len(rates) == SCHEDULE.count("S") and all(low <= r <= high for r in rates), f"positive rates {rates}"


def assert_skipped_snapshot_caught(result: Lockstep, tight: float, loose: float) -> None:
    """The negative control's verdict: failures from the step after the second switch on, the
    stale teacher's parameters among them; none before (the run was right until then)."""
    second_switch = SCHEDULE.rindex("T") + 1
    failures = result.failures(tight, loose)
    early = [f for f in failures if f.startswith("step ") and int(f.split(":")[0].split()[1]) < second_switch]
    assert not early, early[:5]
    assert any(f.startswith(f"step {second_switch}: teacher/param:") for f in failures), failures[:5]
