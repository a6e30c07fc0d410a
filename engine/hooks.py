"""Named observation points of the training loop, for checks and profilers (docs/DESIGN.md, "Trainer").

``Trainer.observe(observer)`` adds a ``StepObserver``; the loop calls each of its methods at the
point it names, in the order below, for every optimizer step:

    before_fetch -> after_fetch          the loader's next batch (the data wait lies between them)
    at_phase_switch                      only before a step whose phase actions run (snapshot, save, restore)
    before_step -> after_step            the step's enqueue: ``Engine.train_step``, the device-side
                                         statistics update and the run-ahead ring's event record
    at_log_point                         after a log point's record is written

Observers look, they do not steer: they must not change the batch or the result they are handed,
and whatever they do on the host counts towards the loop's wall time (images/s). Before the first
``before_step`` the trainer captures the CUDA graphs and waits for the device (by design);
``before_step`` of every step comes after the run-ahead ring's host wait, so the span from
``before_step`` to ``after_step`` is the enqueue alone. A hook that raises stops the run like
any error of the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # this module imports nothing at run time: a check can import it whatever else is broken
    from engine.phases import PhaseAction
    from engine.steps import StepResult
    from pipelines.contract import Batch


class StepObserver:
    """One observer of the loop; every method does nothing here: override the ones you need."""

    def before_fetch(self, step: int) -> None:
        """The loop is about to ask the loader for step ``step``'s batch (0-based step number)."""

    def after_fetch(self, step: int, batch: Batch) -> None:
        """The loader handed over step ``step``'s batch."""

    def at_phase_switch(self, step: int, actions: tuple[PhaseAction, ...]) -> None:
        """``actions`` will run right before step ``step`` (inside its enqueue)."""

    def before_step(self, step: int, batch: Batch) -> None:
        """Step ``step`` is about to be enqueued on ``batch`` (graphs captured, run-ahead wait done)."""

    def after_step(self, step: int, result: StepResult) -> None:
        """Step ``step`` and its statistics are enqueued; ``result`` holds device tensors still being written."""

    def at_log_point(self, step: int, record: dict[str, Any]) -> None:
        """A log point after ``step`` steps; ``record`` is what metrics.jsonl got."""


class StepHooks(StepObserver):
    """The observers of one trainer, called in the order they were added."""

    def __init__(self) -> None:
        self.observers: list[StepObserver] = []

    def add(self, observer: StepObserver) -> None:
        self.observers.append(observer)

    def before_fetch(self, step: int) -> None:
        for observer in self.observers:
            observer.before_fetch(step)

    def after_fetch(self, step: int, batch: Batch) -> None:
        for observer in self.observers:
            observer.after_fetch(step, batch)

    def at_phase_switch(self, step: int, actions: tuple[PhaseAction, ...]) -> None:
        for observer in self.observers:
            observer.at_phase_switch(step, actions)

    def before_step(self, step: int, batch: Batch) -> None:
        for observer in self.observers:
            observer.before_step(step, batch)

    def after_step(self, step: int, result: StepResult) -> None:
        for observer in self.observers:
            observer.after_step(step, result)

    def at_log_point(self, step: int, record: dict[str, Any]) -> None:
        for observer in self.observers:
            observer.at_log_point(step, record)
