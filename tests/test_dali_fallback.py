"""DALI failing to import in any way falls back to the torch loader under backend auto (one warning
line); DALI's output buffers are held until the device work queued on them has run."""

from __future__ import annotations

import importlib.abc
import logging
import sys

import pytest
import torch

import pipelines
from pipelines import resolve_backend


class BrokenDali(importlib.abc.MetaPathFinder):
    """Makes ``import nvidia.dali`` fail as a DALI built for another CUDA can: not an ImportError."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version\nsecond line")
        return None


@pytest.fixture
def broken_dali(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name.startswith("nvidia.dali") or name == "pipelines.dali_backend":
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [BrokenDali(), *sys.meta_path])
    monkeypatch.setattr(pipelines, "_warned_fallback", set())


def test_any_dali_import_failure_falls_back_to_torch_with_one_warning_line(
    broken_dali: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        assert resolve_backend("auto") == "torch"
        assert resolve_backend("auto") == "torch"  # warned once per reason, not per loader
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "RuntimeError: CUDA driver version is insufficient" in warnings[0] and "torch loader" in warnings[0]


def test_asking_for_dali_where_it_fails_names_the_reason_and_the_extras(broken_dali: None) -> None:
    with pytest.raises(RuntimeError, match=r"RuntimeError: CUDA driver.*dali-cuda12.*dali-cuda13"):
        resolve_backend("dali")


class FakeEvent:
    def __init__(self) -> None:
        self.recorded = False
        self.done = False

    def record(self) -> None:
        self.recorded = True

    def query(self) -> bool:
        return self.done


def test_dali_outputs_are_held_until_the_work_queued_on_them_has_run() -> None:
    dali_backend = pytest.importorskip("pipelines.dali_backend", reason="needs NVIDIA DALI")
    events: list[FakeEvent] = []

    def new_event() -> FakeEvent:
        events.append(FakeEvent())
        return events[-1]

    in_use = dali_backend.OutputsInUse(torch.device("cuda"), new_event)
    outputs = [{"images": torch.zeros(1)} for _ in range(4)]
    in_use.hand_out(outputs[0])
    assert not events, "nothing was queued on a batch before the first hand-out"
    in_use.hand_out(outputs[1])  # the consumer has queued its work on batch 0: an event marks it
    assert len(events) == 1 and events[0].recorded
    assert [o for _, o in in_use.held] == outputs[:2], "batch 0 is held while its work may still run"
    events[0].done = True
    in_use.hand_out(outputs[2])
    assert [o for _, o in in_use.held] == outputs[1:3], "batch 0's work ran: released; batch 1's has not"
    in_use.held.clear()
    cpu = dali_backend.OutputsInUse(torch.device("cpu"), new_event)
    cpu.hand_out(outputs[3])
    assert not cpu.held, "CPU batches are the consumer's own memory: nothing to hold"
