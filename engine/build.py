"""The one assembly of the training engine: model, teacher, optimizer, phase switch and steps.

``build_engine`` is called by the trainer, the benchmarks and the tests alike, so what they measure
and check is what ``engine-run`` trains (docs/DESIGN.md, "Engine"). ``Engine.train_step`` is the
whole per-step protocol: phase actions, learning rate, then the (possibly captured) step.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.config import ImitationTargets, Method, RunConfig, TrainTargets
from engine.distributed import broadcast_buffers
from engine.init_weights import load_backbone
from engine.models import build_model, split_parameters
from engine.phases import PhaseAction, PhasePlan, PhaseSwitch
from engine.schedule import lr_at
from engine.steps import (
    GRAPH_WARMUP_ITERS,
    GRAPH_WARMUP_ITERS_DDP,
    Stepper,
    StepResult,
    StepSettings,
    build_stepper,
    init_momentum,
)
from engine.sync_bn import convert_sync_batchnorm
from pipelines.contract import Batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSpec:
    """What the engine needs to know about the data: not in the run config, read from the manifest."""

    num_classes: int
    attributes: bool = False  # supervised targets are multi-hot attributes (CelebA), not single labels
    batches_per_epoch: int = 0  # full global batches of the train split: places epoch milestones (0 = unknown)


def ddp_options(accepted: Mapping[str, object]) -> tuple[dict[str, Any], bool]:
    """``DistributedDataParallel``'s keyword arguments for the torch at hand (``accepted``: the names
    its constructor takes), and whether the caller must broadcast the buffers itself.

    Buffers are synchronised at construction only, never before a forward. torch >= 2.13 says so
    with ``forward_sync_buffers=False``; older torch (2.11, the declared floor) has only
    ``broadcast_buffers=False``, which also leaves them out of the construction sync, so the
    engine broadcasts them once after construction instead."""
    options: dict[str, Any] = {"gradient_as_bucket_view": True, "static_graph": True}
    if "forward_sync_buffers" in accepted:
        return {**options, "forward_sync_buffers": False}, False
    return {**options, "broadcast_buffers": False}, True


class Engine:
    """A learner, its teacher (MILe), optimizer, phase plan and switch, and one step per phase."""

    def __init__(
        self,
        config: RunConfig,
        spec: EngineSpec,
        device: torch.device,
        distributed: bool = False,
        init_weights: bool = True,
    ) -> None:
        """``init_weights``: load ``config.init_checkpoint`` into the learner (False when a resume
        loads a checkpoint over it anyway)."""
        self.config, self.spec, self.device, self.distributed = config, spec, device, distributed
        self.plan = PhasePlan(config.method)
        torch.manual_seed(config.seed)  # same initial weights on every rank (DDP broadcasts them too)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # training shapes never change: pick the fastest kernels once
        self.learner = self._new_model(spec)
        if config.init_checkpoint and init_weights:
            load_backbone(self.learner, Path(config.init_checkpoint))  # before the teacher copies the learner
        self.teacher = self._new_teacher(spec) if config.method.name is Method.MILE else None
        # learning rates of the backbone and the classifier: device tensors read by fused SGD inside the
        # captured steps, filled before every step (the first fill here, for callers that step directly)
        self.lr = torch.full((), self.lr_at(0), device=device)
        self.head_lr = torch.full((), self.lr_at(0) * config.optim.head_lr_scale, device=device)
        self.optimizer = self._new_optimizer()
        self.switch = PhaseSwitch(self.learner, self.teacher, init_momentum(self.optimizer))
        self.settings = StepSettings(
            method=config.method.name.value,
            rho=config.method.rho,
            attributes=spec.attributes,
            autocast_dtype=torch.bfloat16 if (device.type == "cuda" and config.bf16) else None,
            device_type=device.type,
            label_sets=config.method.train_targets is TrainTargets.LABEL_SET,
            soft_imitation=config.method.imitation_targets is ImitationTargets.SOFT,
            imitation_add_label=config.method.imitation_add_label,
        )
        self.model = self._maybe_ddp(self.learner)
        self.stepper: Stepper = build_stepper(self.plan.phases, self.model, self.teacher, self.optimizer, self.settings)

    # -- construction ---------------------------------------------------------------------------

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.config.channels_last else torch.contiguous_format

    def _new_model(self, spec: EngineSpec) -> nn.Module:
        model = build_model(self.config.arch, spec.num_classes, self.config.method.multi_label_head)
        # torch's stubs omit Module.to's memory_format keyword
        return model.to(self.device, memory_format=self.memory_format)  # type: ignore[call-overload]

    def _new_teacher(self, spec: EngineSpec) -> nn.Module:
        # allocated once; refreshed later by device-side copies, never re-created (graph addresses stay valid)
        teacher = self._new_model(spec)
        teacher.load_state_dict(self.learner.state_dict())
        return teacher.eval().requires_grad_(False)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        optim = self.config.optim
        backbone, head = split_parameters(self.learner)
        return torch.optim.SGD(
            [{"params": backbone, "lr": self.lr}, {"params": head, "lr": self.head_lr}],
            lr=self.lr,
            momentum=optim.momentum,
            nesterov=optim.nesterov,
            weight_decay=optim.weight_decay,
            fused=True,
        )

    def _maybe_ddp(self, learner: nn.Module) -> nn.Module:
        """The learner under DDP in a process group (the teacher has no gradients: never wrapped).

        - ``sync_bn``: its BatchNorm layers become SyncBatchNorm, keeping their tensors (the optimizer,
          the phase switch and the teacher copy hold them).
        - no buffer broadcast before each forward (``ddp_options``; buffers are synchronised once, at
          construction): BatchNorm statistics are read only by the teacher snapshot and by
          evaluation, and the engine gives every rank rank 0's statistics right before both
          (``sync_buffers``); a broadcast before every forward would cost a collective per step for
          nothing. Rank 0's statistics, the ones checkpointed, follow its own batches either way.
        - ``static_graph`` and, on CUDA, construction on a side stream: what the PyTorch CUDA-graph
          notes ask for capturing the all-reduce inside the step's graph.
        - ``gradient_as_bucket_view``: after the all-reduce the gradients are views into the buckets,
          so nothing is copied back out of them and no second gradient-sized buffer is kept. It does
          not save the copy *into* the buckets: the steps call ``zero_grad(set_to_none=True)``, so
          each backward makes fresh gradients and DDP's reducer copies every one into its bucket
          once per step (torch's DDP docs say so under ``batched_grad_copy``). Keeping gradients
          instead (``set_to_none=False``) would cost a zero-fill plus an accumulate, more bytes
          than that one copy.
        - ``ddp_bf16_grads``: DDP's bf16 compression hook halves the bytes all-reduced."""
        if not self.distributed:
            return learner
        if self.config.sync_bn:
            convert_sync_batchnorm(learner, self.device.type)
        options, buffers_unsynced = ddp_options(inspect.signature(nn.parallel.DistributedDataParallel).parameters)
        if self.device.type != "cuda":
            model = nn.parallel.DistributedDataParallel(learner, **options)
        else:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                model = nn.parallel.DistributedDataParallel(learner, device_ids=[self.device], **options)
            torch.cuda.current_stream(self.device).wait_stream(side)
        if buffers_unsynced:
            broadcast_buffers(learner)  # what DDP's construction does itself where it has forward_sync_buffers
        return self._with_comm_hook(model)

    def _with_comm_hook(self, model: nn.parallel.DistributedDataParallel) -> nn.Module:
        if self.config.ddp_bf16_grads:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

            model.register_comm_hook(None, bf16_compress_hook)
        return model

    def sync_buffers(self) -> None:
        """Every rank takes rank 0's buffers (BatchNorm statistics): a collective, in a process group only."""
        if self.distributed:
            broadcast_buffers(self.learner)

    # -- running --------------------------------------------------------------------------------

    def capture(self, batch: Batch, debug: bool = False) -> str | None:
        """Capture every phase's step as a CUDA graph on ``batch``'s shapes; the reason if they stay
        eager. ``debug``: keep the graphs' descriptions for ``GraphedStep.dump`` (checks)."""
        if not self.config.cuda_graphs:
            return "CUDA graphs turned off (--cuda-graphs false)"
        if self.device.type != "cuda":
            return f"device is {self.device.type}: steps run eagerly"
        warmup = GRAPH_WARMUP_ITERS_DDP if self.distributed else GRAPH_WARMUP_ITERS
        try:
            self.stepper.capture(
                (batch.images, batch.labels, batch.targets), self.learner, self.optimizer, warmup, debug=debug
            )
        except RuntimeError as error:  # capture can fail on exotic ops; eager still trains
            return f"CUDA graph capture failed ({error}); running eagerly"
        return None

    def lr_at(self, step: int) -> float:
        return lr_at(
            step, self.config.num_steps, self.config.optim, self.config.global_batch_size, self.spec.batches_per_epoch
        )

    def train_step(self, step: int, batch: Batch) -> StepResult:
        """Optimizer step number ``step`` (0-based) on ``batch``: no host sync anywhere in it."""
        actions = self.plan.transitions_before(step)
        if PhaseAction.SNAPSHOT_TEACHER in actions:
            # Without SyncBatchNorm each rank's BatchNorm statistics follow its own batches; the
            # teacher must be one network on every rank, or the ranks would disagree on pseudo-labels.
            # One collective of a few kilobytes (statistics only) every k steps, outside the graphs.
            self.sync_buffers()
        self.switch.apply(actions)
        lr = self.lr_at(step)
        self.lr.fill_(lr)  # fill_ with a Python float is a kernel launch, not a sync
        self.head_lr.fill_(lr * self.config.optim.head_lr_scale)
        return self.stepper(self.plan.position(step).phase, batch.images, batch.labels, batch.targets)

    # -- state ----------------------------------------------------------------------------------

    def components(self) -> dict[str, Any]:
        """The engine's parts that carry state, by checkpoint name."""
        parts: dict[str, Any] = {
            "learner": self.learner,
            "optimizer": OptimizerInPlace(self.optimizer, [self.lr, self.head_lr]),
            "phase_switch": self.switch,
        }
        if self.teacher is not None:
            parts["teacher"] = self.teacher
        return parts


class OptimizerInPlace:
    """The optimizer's state_dict, loaded into the tensors that already exist: the momentum
    buffers keep their addresses (the phase switch and captured graphs point at them) and the
    learning rate of each parameter group stays the device tensor the steps read."""

    def __init__(self, optimizer: torch.optim.Optimizer, group_lrs: list[torch.Tensor]) -> None:
        self.optimizer, self.group_lrs = optimizer, group_lrs

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        existing = {
            id(p): dict(self.optimizer.state[p]) for group in self.optimizer.param_groups for p in group["params"]
        }
        self.optimizer.load_state_dict(state)
        for group, lr in zip(self.optimizer.param_groups, self.group_lrs, strict=True):
            group["lr"] = lr
            for param in group["params"]:
                for name, old in existing[id(param)].items():
                    new = self.optimizer.state[param].get(name)
                    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
                        old.copy_(new)
                        self.optimizer.state[param][name] = old


def build_engine(
    config: RunConfig, spec: EngineSpec, device: torch.device, distributed: bool = False, init_weights: bool = True
) -> Engine:
    """The engine ``engine-run`` trains with: what the trainer, benchmarks and tests all call."""
    return Engine(config, spec, device, distributed, init_weights)
