"""Learning-rate schedule per optimizer step: linear warmup, then cosine, step (every N steps or at
milestones) or constant."""

from __future__ import annotations

import bisect
import math

from engine.config import MilestoneUnit, OptimConfig


def peak_lr(optim: OptimConfig, global_batch_size: int) -> float:
    """The linear scaling rule: ``lr_per_256`` is the rate for 256 images per step."""
    return optim.lr_per_256 * global_batch_size / 256


def lr_at(step: int, num_steps: int, optim: OptimConfig, global_batch_size: int, batches_per_epoch: int = 0) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``num_steps``; ``batches_per_epoch``
    (full global batches of the train split) places milestones given in epochs."""
    peak = peak_lr(optim, global_batch_size)
    if step < optim.warmup_lr_steps:
        return peak * (step + 1) / optim.warmup_lr_steps
    if optim.schedule == "constant":
        return peak
    if optim.schedule == "step":
        return peak * optim.step_decay_factor ** decays_before(step, optim, batches_per_epoch)
    decay_steps = max(1, num_steps - optim.warmup_lr_steps)
    progress = min(1.0, (step - optim.warmup_lr_steps) / decay_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def decays_before(step: int, optim: OptimConfig, batches_per_epoch: int = 0) -> int:
    """How many step-schedule decays apply at optimizer step ``step`` (0-based): one per milestone
    m <= step, or one per whole ``step_decay_every`` steps. Milestones count optimizer steps from 0."""
    if optim.lr_milestones:
        return bisect.bisect_right(milestone_steps(optim, batches_per_epoch), step)
    return step // optim.step_decay_every


def milestone_steps(optim: OptimConfig, batches_per_epoch: int) -> list[int]:
    """``optim.lr_milestones`` in optimizer steps: epoch milestones start at epoch m's first step."""
    if optim.lr_milestones_unit is MilestoneUnit.STEPS:
        return list(optim.lr_milestones)
    if batches_per_epoch < 1:
        raise ValueError("optim.lr_milestones_unit = epochs needs the train split's batches per epoch")
    return [m * batches_per_epoch for m in optim.lr_milestones]
