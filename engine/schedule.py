"""Learning-rate schedule per optimizer step: linear warmup, then cosine, step (every N steps or at
milestones) or constant."""

from __future__ import annotations

import bisect
import math

from engine.config import OptimConfig


def peak_lr(optim: OptimConfig, global_batch_size: int) -> float:
    """The linear scaling rule: ``lr_per_256`` is the rate for 256 images per step."""
    return optim.lr_per_256 * global_batch_size / 256


def lr_at(step: int, num_steps: int, optim: OptimConfig, global_batch_size: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``num_steps``."""
    peak = peak_lr(optim, global_batch_size)
    if step < optim.warmup_lr_steps:
        return peak * (step + 1) / optim.warmup_lr_steps
    if optim.schedule == "constant":
        return peak
    if optim.schedule == "step":
        return peak * optim.step_decay_factor ** decays_before(step, optim)
    decay_steps = max(1, num_steps - optim.warmup_lr_steps)
    progress = min(1.0, (step - optim.warmup_lr_steps) / decay_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def decays_before(step: int, optim: OptimConfig) -> int:
    """How many step-schedule decays apply at optimizer step ``step`` (0-based): one per milestone
    m <= step, or one per whole ``step_decay_every`` steps. Milestones count optimizer steps from 0."""
    if optim.lr_milestones:
        return bisect.bisect_right(optim.lr_milestones, step)
    return step // optim.step_decay_every
