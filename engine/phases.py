"""The MILe phase machine (docs/DESIGN.md, "MILe phases"): which phase each step is in, and what happens between phases.

Steps are numbered from 0. For MILe the first teacher (interaction) phase lasts
``warmup_steps + k_teacher_steps`` steps; then imitation (``k_student_steps``) and interaction
(``k_teacher_steps``) alternate. Baselines have a single phase, ``train``.

Between steps:
- teacher -> student: the teacher snapshot takes the learner's parameters and buffers (a
  device-side copy into the teacher allocated once); with ``student_init="previous"`` the learner
  then gets back the student weights saved before the teacher phase.
- (start) or student -> teacher, ``student_init="previous"`` only: save the learner's weights.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.config import Choice, Method, MethodConfig, StudentInit


class Phase(Choice):
    TRAIN = "train"  # the baselines' only phase
    TEACHER = "teacher"  # MILe interaction: steps on the dataset's labels
    STUDENT = "student"  # MILe imitation: steps on the teacher's pseudo-labels


TRAIN, TEACHER, STUDENT = Phase.TRAIN, Phase.TEACHER, Phase.STUDENT


class PhaseAction(enum.Enum):
    """What runs between two steps when the phase changes."""

    SNAPSHOT_TEACHER = "snapshot_teacher"  # teacher <- learner (parameters and BatchNorm statistics)
    SAVE_STUDENT = "save_student"  # student_init=previous: keep the student's weights and momentum
    RESTORE_STUDENT = "restore_student"  # student_init=previous: put them back after the snapshot


@dataclass(frozen=True)
class PhasePosition:
    """Where a step sits: phase name, index within the phase, and the iterated-learning cycle."""

    phase: Phase
    step_in_phase: int
    cycle: int


@dataclass(frozen=True)
class PhasePlan:
    method: MethodConfig

    @property
    def phases(self) -> tuple[Phase, ...]:
        return (TEACHER, STUDENT) if self.method.name is Method.MILE else (TRAIN,)

    def position(self, step: int) -> PhasePosition:
        """The phase of step ``step``: a pure function, so a resumed run lands mid-phase exactly."""
        if self.method.name is not Method.MILE:
            return PhasePosition(TRAIN, step, 0)
        first_teacher_steps = self.method.warmup_steps + self.method.k_teacher_steps
        if step < first_teacher_steps:
            return PhasePosition(TEACHER, step, 0)
        period = self.method.k_student_steps + self.method.k_teacher_steps
        cycle, offset = divmod(step - first_teacher_steps, period)
        if offset < self.method.k_student_steps:
            return PhasePosition(STUDENT, offset, cycle)
        return PhasePosition(TEACHER, offset - self.method.k_student_steps, cycle + 1)

    def transitions_before(self, step: int) -> tuple[PhaseAction, ...]:
        """The actions to run before step ``step``, in order."""
        current = self.position(step).phase
        previous = self.position(step - 1).phase if step > 0 else None
        previous_init = self.method.student_init is StudentInit.PREVIOUS
        actions: list[PhaseAction] = []
        if previous is TEACHER and current is STUDENT:
            actions.append(PhaseAction.SNAPSHOT_TEACHER)
            if previous_init:
                actions.append(PhaseAction.RESTORE_STUDENT)
        if current is TEACHER and previous is not TEACHER and previous_init:
            actions.append(PhaseAction.SAVE_STUDENT)
        return tuple(actions)


def module_state(module: nn.Module) -> list[torch.Tensor]:
    """Parameters then buffers (BatchNorm statistics included), in a fixed order."""
    return [p.data for p in module.parameters()] + list(module.buffers())


class TensorMirror:
    """Device-resident copies of a fixed list of tensors, allocated once; copies never reallocate,
    so tensor addresses captured in CUDA graphs stay valid."""

    def __init__(self, like: list[torch.Tensor]) -> None:
        self.tensors = [torch.empty_like(t) for t in like]

    @torch.no_grad()
    def copy_from(self, source: list[torch.Tensor]) -> None:
        torch._foreach_copy_(self.tensors, source)

    @torch.no_grad()
    def copy_to(self, target: list[torch.Tensor]) -> None:
        torch._foreach_copy_(target, self.tensors)


class PhaseSwitch:
    """Runs the between-phase actions on device (no host sync, no allocation)."""

    def __init__(self, learner: nn.Module, teacher: nn.Module | None, optimizer_state: list[torch.Tensor]) -> None:
        self.learner_state = module_state(learner)
        self.teacher_state = module_state(teacher) if teacher is not None else []
        # the saved student includes SGD momentum, so "previous" students never inherit
        # momentum accumulated on the ground-truth labels
        self.student_state = self.learner_state + optimizer_state
        self.saved_student: TensorMirror | None = None

    def apply(self, actions: tuple[PhaseAction, ...]) -> None:
        for action in actions:
            if action is PhaseAction.SNAPSHOT_TEACHER:
                with torch.no_grad():
                    torch._foreach_copy_(self.teacher_state, self.learner_state)
            elif action is PhaseAction.SAVE_STUDENT:
                self._mirror().copy_from(self.student_state)
            elif action is PhaseAction.RESTORE_STUDENT:
                self._mirror().copy_to(self.student_state)
            else:
                raise ValueError(f"unknown phase action {action!r}")

    def state_dict(self) -> dict[str, Any]:
        saved = self.saved_student
        return {"saved_student": [t.clone() for t in saved.tensors] if saved is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["saved_student"] is not None:
            self._mirror().copy_from(state["saved_student"])  # into the mirror allocated once

    def _mirror(self) -> TensorMirror:
        if self.saved_student is None:
            self.saved_student = TensorMirror(self.student_state)
        return self.saved_student
