"""Training steps: one capturable function per phase (forward, loss, backward, optimizer step).

On CUDA each phase's step is captured once as a CUDA graph over static input buffers and replayed;
on CPU, or with graphs off, or where capture fails, the same function runs eagerly (the reason is
logged). The learning rate lives in a device tensor read by fused SGD, so nothing in a step needs
the host: no ``.item()``, no Python branching on tensor values.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from engine.losses import (
    bce_multi_hot,
    bce_one_hot,
    bce_pseudo_labels,
    imitation_targets,
    label_set_targets,
    logit,
    softmax_cross_entropy,
)
from engine.phases import STUDENT, TEACHER, TRAIN, module_state

log = logging.getLogger(__name__)
GRAPH_WARMUP_ITERS = 3  # eager iterations on a side stream before capture, as the CUDA-graph docs ask
GRAPH_WARMUP_ITERS_DDP = 11  # under DDP: "at least 11 DDP-enabled eager iterations before capture" (same notes)


@dataclass
class StepResult:
    """What every step returns, whatever the method: device tensors, valid until the next step."""

    loss: torch.Tensor  # 0-d float32
    logits: torch.Tensor  # N×C, the learner's


@dataclass(frozen=True)
class StepSettings:
    method: str  # softmax | sigmoid | mile
    rho: float
    attributes: bool  # supervised targets are multi-hot attributes (CelebA), not single labels
    autocast_dtype: torch.dtype | None  # bf16 on CUDA, None = full precision
    device_type: str
    label_sets: bool = False  # supervised steps train on the batch's multi-hot label sets (method.train_targets)
    soft_imitation: bool = False  # method.imitation_targets = soft (an extension)
    imitation_add_label: bool = False  # method.imitation_add_label (a released-code option)


StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], StepResult]


def supervised_loss(
    settings: StepSettings,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    if settings.attributes:
        return _attribute_loss
    if settings.label_sets:
        return _label_set_loss
    if settings.method == "softmax":
        return lambda logits, labels, targets: softmax_cross_entropy(logits, labels)
    return lambda logits, labels, targets: bce_one_hot(logits, labels)


def pseudo_label_loss(settings: StepSettings) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """MILe's imitation loss (logits, teacher logits, labels): the paper's fused rule, or a variant's targets."""
    logit_rho = logit(settings.rho)
    if not (settings.soft_imitation or settings.imitation_add_label):
        return lambda logits, teacher_logits, labels: bce_pseudo_labels(logits, teacher_logits, logit_rho)

    def variant(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = imitation_targets(
            teacher_logits, logit_rho, labels, settings.soft_imitation, settings.imitation_add_label
        )
        return bce_multi_hot(logits, targets)

    return variant


def _attribute_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    assert targets is not None  # attribute splits always carry their multi-hot targets
    return bce_multi_hot(logits, targets)


def _label_set_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    assert targets is not None  # the plan admits label_set only for splits with label sets (check_train_targets)
    return bce_multi_hot(logits, label_set_targets(labels, targets))


def autocast_context(dtype: torch.dtype | None, device_type: str):
    """bf16 autocast on CUDA; nothing (full precision) where ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    # cache off: CUDA graphs and the autocast weight cache do not mix (PyTorch CUDA-graph notes)
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


def make_step(
    phase: str, learner: nn.Module, teacher: nn.Module | None, optimizer: torch.optim.Optimizer, settings: StepSettings
) -> StepFn:
    """The step function of one phase; the loop calls it the same way for every method."""
    loss_on_labels = supervised_loss(settings)
    imitation_loss = pseudo_label_loss(settings)

    def step(images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> StepResult:
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(settings.autocast_dtype, settings.device_type):
            logits = learner(images)
            if phase == STUDENT:
                assert teacher is not None  # build_engine gives every MILe stepper a teacher
                with torch.no_grad():
                    teacher_logits = teacher(images)  # same augmented batch, teacher in eval mode
                loss = imitation_loss(logits, teacher_logits, labels)
            else:
                loss = loss_on_labels(logits, labels, targets)
        loss.backward()
        optimizer.step()
        return StepResult(loss.detach(), logits.detach())

    return step


class StaticInputs:
    """Fixed device buffers a graph reads; ``fill`` names exactly what changed when a batch does not fit."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> None:
        self.images = images.clone(memory_format=torch.preserve_format)
        self.labels = labels.clone()
        self.targets = targets.clone() if targets is not None else None

    def fill(self, images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> None:
        for name, static, new in (
            ("images", self.images, images),
            ("labels", self.labels, labels),
            ("targets", self.targets, targets),
        ):
            if static is None and new is None:
                continue
            if static is None or new is None:
                raise ValueError(
                    f"captured step: {name} was {'absent' if static is None else 'present'} at capture, now it is not"
                )
            if (static.shape, static.dtype, static.device) != (new.shape, new.dtype, new.device):
                raise ValueError(
                    f"captured step: {name} changed from {tuple(static.shape)} {static.dtype} {static.device} "
                    f"to {tuple(new.shape)} {new.dtype} {new.device}; training batches must keep one shape"
                )
            if static.stride() != new.stride():
                raise ValueError(
                    f"captured step: {name} changed strides from {static.stride()} to {new.stride()} (memory format)"
                )
            static.copy_(new, non_blocking=True)


class GraphedStep:
    """A step function captured as a CUDA graph, replayed with new inputs copied into static buffers."""

    def __init__(self, fn: StepFn, inputs: StaticInputs, debug: bool = False) -> None:
        """``debug``: keep the captured graph for ``dump`` (a check lists its kernel nodes)."""
        self.inputs = inputs
        self.graph = torch.cuda.CUDAGraph()
        if debug:
            self.graph.enable_debug_mode()
        # thread_local: loader threads (DALI's workers, the DataLoader's pin-memory thread) keep
        # running during capture; their CUDA calls are legal and must not abort this capture,
        # which "global" mode would do. This thread's own unsafe calls still fail the capture.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.result = fn(inputs.images, inputs.labels, inputs.targets)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> StepResult:
        self.inputs.fill(images, labels, targets)
        self.graph.replay()
        return self.result

    def dump(self, path: str) -> None:
        """Write the graph's nodes (kernels by name, copies, ...) as a Graphviz DOT file; once, and
        only when captured with ``debug`` (CUDA frees the graph description after the dump)."""
        self.graph.debug_dump(path)


# Steps the host may queue ahead of the device. Two keep the device fed: while it runs step i,
# step i+1 is already queued, so it never idles waiting for the host's next launch. More buys no
# speed, only more batches held in flight and a host (logs, signals) further behind the device.
RUN_AHEAD_STEPS = 2


class DeviceEvent(Protocol):
    """What ``RunAheadLimit`` uses of ``torch.cuda.Event``."""

    def record(self) -> None: ...

    def synchronize(self) -> None: ...


class RunAheadLimit:
    """Bounds the host's run-ahead: a ring of CUDA events, one recorded after each step; before
    step i the host waits (on the host, no stream sync) for the event of step i - depth. No-op on CPU.

    The ring also keeps each step's batch referenced until that wait, so the loader's tensors
    outlive every device read of them by construction: captured steps read them in the copy into
    their static buffers, eager steps read them directly, both only when the queued work runs.
    Memory from torch's caching allocator would be safe without this (a freed block is reused
    only by work queued later on the same stream), but a loader handing out its own buffers
    (DALI outputs shared through DLPack) may recycle them as soon as the last reference goes; a
    copy into a persistent buffer would not help, since that copy is queued too. A batch made from
    such buffers by kernels the loader queues itself (the DALI loader's bf16 cast and int64 labels)
    no longer references them: that loader holds its buffers itself until the work queued on them
    has run (``pipelines.dali_backend.OutputsInUse``)."""

    def __init__(
        self, device: torch.device, depth: int = RUN_AHEAD_STEPS, new_event: Callable[[], DeviceEvent] | None = None
    ) -> None:
        if depth < 1:
            raise ValueError(f"run-ahead depth must be >= 1, got {depth}")
        self.enabled = device.type == "cuda"
        make = new_event or (lambda: torch.cuda.Event(blocking=True))  # blocking: yield the core to loader threads
        self.events: list[DeviceEvent] = [make() for _ in range(depth)] if self.enabled else []
        self.in_flight: list[object | None] = [None] * depth  # the batch each slot's step reads, or None
        self.steps_queued = 0

    def wait_turn(self) -> None:
        """Before a step: wait until the step ``depth`` steps back has finished on the device."""
        if not self.enabled:
            return
        slot = self.steps_queued % len(self.events)
        if self.in_flight[slot] is not None:
            self.events[slot].synchronize()  # a host wait on one event: not a stream sync
            self.in_flight[slot] = None  # its batch may now be recycled by the loader

    def step_queued(self, batch: object) -> None:
        """After a step (and everything reading its outputs) is queued on the current stream."""
        if self.enabled:
            slot = self.steps_queued % len(self.events)
            self.events[slot].record()
            self.in_flight[slot] = batch
        self.steps_queued += 1


class Stepper:
    """Owns the per-phase step functions, captured as CUDA graphs where possible."""

    def __init__(self, steps: dict[str, StepFn]) -> None:
        self.steps: dict[str, StepFn] = dict(steps)
        self.graphed = False

    def __call__(
        self, phase: str, images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None
    ) -> StepResult:
        return self.steps[phase](images, labels, targets)

    def capture(
        self,
        sample: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        learner: nn.Module,
        optimizer: torch.optim.Optimizer,
        warmup_iters: int = GRAPH_WARMUP_ITERS,
        debug: bool = False,
    ) -> None:
        """Capture every phase's step; state changed by the warm-up iterations is put back.
        ``debug``: keep each graph's description for ``GraphedStep.dump``."""
        check_current_device(sample[0].device)
        saved = _snapshot(learner, optimizer)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for fn in self.steps.values():
                for _ in range(warmup_iters):
                    fn(*sample)
        torch.cuda.current_stream().wait_stream(side)
        _restore(saved, learner, optimizer)
        # one private memory pool per graph: phases replay in any order, so their pools must not alias
        self.steps = {phase: GraphedStep(fn, StaticInputs(*sample), debug) for phase, fn in self.steps.items()}
        self.graphed = True


class CaptureDeviceError(ValueError):
    """The current CUDA device is not the batch's: a capture would record on another device's streams."""


def check_current_device(device: torch.device) -> None:
    """Refuse to capture unless ``device`` (where the batch lives) is the current CUDA device.

    Capture and warm-up run on the current device's streams; a batch on another device would
    give a graph that records nothing of the step, and replays that silently do nothing."""
    current = torch.cuda.current_device()
    if device.type != "cuda" or device.index != current:
        raise CaptureDeviceError(
            f"CUDA graph capture: the batch is on {device} but the current CUDA device is cuda:{current}; "
            f"call torch.cuda.set_device({str(device)!r}) first (engine.distributed.init_distributed does)"
        )


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def _snapshot(learner: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t.detach().clone() for t in module_state(learner) + _optimizer_tensors(optimizer)]


@torch.no_grad()
def _restore(saved: list[torch.Tensor], learner: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    torch._foreach_copy_(module_state(learner) + _optimizer_tensors(optimizer), saved)


def build_stepper(
    phases: tuple[str, ...],
    learner: nn.Module,
    teacher: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    settings: StepSettings,
) -> Stepper:
    for phase in phases:
        if phase not in (TRAIN, TEACHER, STUDENT):
            raise ValueError(f"unknown phase {phase!r}")
    return Stepper({phase: make_step(phase, learner, teacher, optimizer, settings) for phase in phases})


def init_momentum(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Create SGD momentum buffers up front (zeros give the same first update as none: buf = grad),
    so their addresses exist before graph capture and phase mirrors can include them."""
    buffers = []
    for group in optimizer.param_groups:
        if group.get("momentum", 0) == 0:
            continue
        for param in group["params"]:
            state = optimizer.state[param]
            if "momentum_buffer" not in state or state["momentum_buffer"] is None:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            buffers.append(state["momentum_buffer"])
    return buffers
