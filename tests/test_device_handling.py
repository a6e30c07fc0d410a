"""CUDA device handling that a CPU can check: the current device is set for every CUDA run, capture
refuses a batch on another device, captures tolerate loader threads, and the trainer bounds how far
the host runs ahead of the device. ``torch.cuda`` is stubbed where a check needs it; what is stubbed
is only the call being checked, never the code under test."""

from __future__ import annotations

import pytest
import torch

from engine import distributed, steps
from engine.steps import CaptureDeviceError, RunAheadLimit, Stepper, StepResult, check_current_device
from pipelines.contract import Batch


@pytest.fixture
def fake_cuda(monkeypatch) -> list[torch.device]:
    """CUDA "available", and every set_device call recorded (nothing else of CUDA is touched)."""
    calls: list[torch.device] = []
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda device: calls.append(torch.device(device)))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_single_process_cuda_n_sets_the_current_device(fake_cuda: list[torch.device]) -> None:
    """--device cuda:1 in one process: streams, events and captures must be made on device 1."""
    info = distributed.init_distributed("cuda:1")
    assert info.device == torch.device("cuda", 1)
    assert fake_cuda == [torch.device("cuda", 1)]


def test_plain_cuda_sets_the_local_rank_device(fake_cuda: list[torch.device], monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.init_distributed("cuda").device == torch.device("cuda", 0)
    assert fake_cuda == [torch.device("cuda", 0)]


def test_cpu_run_sets_no_cuda_device(fake_cuda: list[torch.device]) -> None:
    assert distributed.init_distributed("cpu").device == torch.device("cpu")
    assert fake_cuda == []


def test_capture_refuses_a_batch_off_the_current_device(monkeypatch) -> None:
    monkeypatch.setattr(steps.torch.cuda, "current_device", lambda: 0)
    check_current_device(torch.device("cuda", 0))  # the same device: fine
    with pytest.raises(
        CaptureDeviceError, match=r"batch is on cuda:1 but the current CUDA device is cuda:0.*set_device\('cuda:1'\)"
    ):
        check_current_device(torch.device("cuda", 1))
    # Stepper.capture checks first, before any stream or warm-up step is made; and the error is not
    # a RuntimeError, so Engine.capture (which falls back to eager on RuntimeError) does not hide it
    assert not issubclass(CaptureDeviceError, RuntimeError)
    sample = (torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), None)
    with pytest.raises(CaptureDeviceError, match="batch is on cpu"):
        Stepper({}).capture(sample, torch.nn.Linear(1, 1), torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1))


def test_graph_capture_tolerates_loader_threads(monkeypatch) -> None:
    """Loader threads run CUDA calls during capture; "global" mode would abort the capture."""
    seen: dict[str, object] = {}

    class FakeGraphContext:
        def __init__(self, graph, **kwargs) -> None:
            seen.update(kwargs)

        def __enter__(self) -> None:
            return None

        def __exit__(self, *args) -> None:
            return None

    monkeypatch.setattr(steps.torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(steps.torch.cuda, "graph", FakeGraphContext)
    inputs = steps.StaticInputs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), None)
    steps.GraphedStep(lambda images, labels, targets: None, inputs)  # type: ignore[arg-type,return-value]  # never run
    assert seen.get("capture_error_mode") == "thread_local"


class FakeEvent:
    """Stands in for torch.cuda.Event: knows which step it was last recorded after."""

    def __init__(self, log: list[tuple[str, int]], clock: list[int]) -> None:
        self.log, self.clock, self.step = log, clock, -1

    def record(self) -> None:
        self.step = self.clock[0]

    def synchronize(self) -> None:
        self.log.append(("wait for step", self.step))


def test_run_ahead_waits_for_the_step_depth_back_and_holds_batches_until_then() -> None:
    log: list[tuple[str, int]] = []
    clock = [0]
    ring = RunAheadLimit(torch.device("cuda"), depth=2, new_event=lambda: FakeEvent(log, clock))
    held_counts = []
    for step in range(6):
        clock[0] = step
        log.append(("step", step))
        ring.wait_turn()
        ring.step_queued(f"batch {step}")
        held_counts.append(sum(b is not None for b in ring.in_flight))
        assert f"batch {step}" in ring.in_flight
        if step >= 2:
            assert f"batch {step - 2}" not in ring.in_flight  # released only after its step was waited for
    expected = [("step", 0), ("step", 1)]
    for step in range(2, 6):
        expected += [("step", step), ("wait for step", step - 2)]
    assert log == expected
    assert max(held_counts) == 2


def test_run_ahead_is_a_no_op_on_cpu() -> None:
    ring = RunAheadLimit(torch.device("cpu"))
    for _ in range(3):
        ring.wait_turn()
        ring.step_queued(object())
    assert ring.events == [] and all(b is None for b in ring.in_flight) and ring.steps_queued == 3
    with pytest.raises(ValueError, match="depth must be >= 1"):
        RunAheadLimit(torch.device("cpu"), depth=0)


def test_trainer_waits_its_turn_before_each_step(tmp_path, monkeypatch) -> None:
    """The real training loop: wait_turn before every step, step_queued (holding the batch) after it."""
    from engine import trainer as trainer_module
    from engine.config import build_config
    from engine.distributed import DistInfo
    from shards.sources import digits_grid
    from shards.writer import WriterSettings, write_split

    root = tmp_path / "grid"
    grid = digits_grid.GridConfig(train_size=64, val_size=32, seed=3)
    for split, items in digits_grid.grid_items(grid).items():
        write_split(root, digits_grid.grid_spec(split, grid), items, WriterSettings(progress=False))
    events: list[str] = []

    class SpyRing:
        def __init__(self, device: torch.device) -> None:
            events.append(f"ring on {device.type}")

        def wait_turn(self) -> None:
            events.append("wait")

        def step_queued(self, batch) -> None:
            events.append(f"queued {type(batch).__name__}")

    monkeypatch.setattr(trainer_module, "RunAheadLimit", SpyRing)
    values = {
        "data.root": str(root),
        "arch": "grid_cnn",
        "data.image_size_px": 24,
        "data.augment": False,
        "data.num_workers": 0,
        "data.backend": "torch",
        "num_steps": 3,
        "global_batch_size": 16,
        "method.k_teacher_steps": 1,
        "method.k_student_steps": 1,
        "out_dir": str(tmp_path / "run"),
        "device": "cpu",
    }
    trainer = trainer_module.Trainer(build_config({}, values), DistInfo(0, 1, 0, torch.device("cpu")))
    original = trainer.engine.train_step

    def logged_train_step(step: int, batch: Batch) -> StepResult:
        events.append(f"step {step}")
        return original(step, batch)

    monkeypatch.setattr(trainer.engine, "train_step", logged_train_step)
    trainer.run()
    assert events == ["ring on cpu"] + [e for step in range(3) for e in ("wait", f"step {step}", "queued Batch")]
