"""The trainer's named observation points (``engine.hooks``) and its images/s from wall time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from helpers import CPU, tiny_config

from engine.hooks import StepObserver
from engine.run_folder import read_metrics
from engine.trainer import Trainer

FETCH_DELAY_S = 0.05  # a slow loader: every batch waits this long
EVAL_DELAY_S = 2.0  # a slow evaluation: must not count as training time


class Recorder(StepObserver):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.switch_actions: dict[int, tuple[Any, ...]] = {}

    def before_fetch(self, step: int) -> None:
        self.calls.append(("before_fetch", step))

    def after_fetch(self, step: int, batch: Any) -> None:
        self.calls.append(("after_fetch", step))

    def at_phase_switch(self, step: int, actions: tuple[Any, ...]) -> None:
        self.calls.append(("at_phase_switch", step))
        self.switch_actions[step] = actions

    def before_step(self, step: int, batch: Any) -> None:
        self.calls.append(("before_step", step))

    def after_step(self, step: int, result: Any) -> None:
        assert result.loss.dim() == 0  # the step's device result is handed over
        self.calls.append(("after_step", step))

    def at_log_point(self, step: int, record: dict[str, Any]) -> None:
        assert record["kind"] == "train" and record["step"] == step
        self.calls.append(("at_log_point", step))


def test_observers_see_every_step_in_order(grid_root: Path, tmp_path: Path) -> None:  # noqa: F811
    trainer = Trainer(tiny_config(grid_root, tmp_path / "run"), CPU)
    recorder = Recorder()
    trainer.observe(recorder)
    trainer.run()
    plan = trainer.engine.plan
    expected: list[tuple[str, int]] = []
    for step in range(12):
        expected += [("before_fetch", step), ("after_fetch", step)]
        if plan.transitions_before(step):
            expected.append(("at_phase_switch", step))
        expected += [("before_step", step), ("after_step", step)]
        if (step + 1) % 2 == 0:  # log_every 2
            expected.append(("at_log_point", step + 1))
    assert recorder.calls == expected
    assert recorder.switch_actions == {s: plan.transitions_before(s) for s in range(12) if plan.transitions_before(s)}
    assert recorder.switch_actions, "k_t=3, k_s=2 over 12 steps switches phases"


def test_images_per_s_counts_the_loader_wait_and_not_the_evaluation(
    grid_root: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(grid_root, out), CPU)  # batch 32, a log point every 2 steps, eval at 6 and 12
    epoch, evaluate = trainer.train_loader.epoch, trainer.evaluate

    def slow_epoch(number: int, start: int = 0) -> Any:
        for batch in epoch(number, start):
            time.sleep(FETCH_DELAY_S)
            yield batch

    def slow_evaluate() -> dict[str, float]:
        time.sleep(EVAL_DELAY_S)
        return evaluate()

    monkeypatch.setattr(trainer.train_loader, "epoch", slow_epoch)
    monkeypatch.setattr(trainer, "evaluate", slow_evaluate)
    trainer.run()
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
    for record in train:
        images = record["labelled_images"] + record["unlabelled_images"]
        # the first interval's first fetch is the loader's start-up, left out with the graph capture
        fetches = 1 if record["step"] == 2 else 2
        assert record["data_wait_s"] >= fetches * FETCH_DELAY_S * 0.9, record
        assert record["train_seconds"] >= record["data_wait_s"], record  # the wait is part of the wall time
        assert abs(record["images_per_s"] * record["train_seconds"] - images) < 1e-6 * images, record
    # the evaluation after step 6 is not training time: the interval after it is no longer than the next
    by_step = {record["step"]: record for record in train}
    assert by_step[8]["train_seconds"] < by_step[10]["train_seconds"] + EVAL_DELAY_S / 2, (by_step[8], by_step[10])
