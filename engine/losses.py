"""Losses, written so no targets tensor has to be built: one-hot and pseudo-labels stay implicit.

BCE with logits for a 0/1 target y is ``softplus(z) - z*y``. Summed over classes and averaged over
the batch (docs/DESIGN.md, "MILe phases"):

- one-hot labels:   sum_c softplus(z_c) - z_label
- label sets (``method.train_targets = label_set``): the split's multi-hot set with the given label
  set as well (``label_set_targets``), then the multi-hot form sum_c softplus(z_c) - z_c*y_c
- teacher pseudo-labels y_c = 1[sigmoid(t_c) > rho] = 1[t_c > logit(rho)]:
                    sum_c softplus(z_c) - where(t_c > logit(rho), z_c, 0)

Thresholding the teacher's logits against ``logit(rho)`` is exact (sigmoid is monotone) and
avoids the sigmoid's float rounding near 0 and 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def logit(probability: float) -> float:
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    return math.log(probability) - math.log1p(-probability)


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def bce_one_hot(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE against one-hot ``labels``, summed over classes, mean over the batch."""
    z = logits.float()
    return (F.softplus(z).sum() - z.gather(1, labels[:, None]).sum()) / z.shape[0]


def bce_multi_hot(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE against given 0/1 targets (attribute datasets), summed over classes, mean over the batch."""
    z = logits.float()
    return (F.softplus(z) - z * targets).sum() / z.shape[0]


def label_set_targets(labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The multi-hot training targets of a classification split: each image's label set, its given
    label set too (the set always holds it; an image whose set is empty trains on its label alone).
    Out of place and shape-preserving, so a captured step may compute it."""
    return targets.float().scatter(1, labels[:, None], 1.0)


def imitation_targets(
    teacher_logits: torch.Tensor, logit_rho: float, labels: torch.Tensor, soft: bool, add_label: bool
) -> torch.Tensor:
    """The student's float targets of MILe's variants (``bce_pseudo_labels`` is the faithful rule, fused):
    the teacher's sigmoid (``soft``) or its thresholded sigmoid, with the given label set to 1 when
    ``add_label`` (images without a label, -1, keep the teacher's targets). Shape-preserving, no host sync."""
    t = teacher_logits.float()
    targets = torch.sigmoid(t) if soft else (t > logit_rho).float()
    if add_label:
        classes = torch.arange(t.shape[1], device=t.device)
        targets = torch.maximum(targets, (classes == labels[:, None]).float())
    return targets


def bce_pseudo_labels(logits: torch.Tensor, teacher_logits: torch.Tensor, logit_rho: float) -> torch.Tensor:
    """BCE of the student against the teacher's thresholded sigmoid, fused (no targets tensor)."""
    z = logits.float()
    positive = teacher_logits.float() > logit_rho
    return (F.softplus(z) - torch.where(positive, z, torch.zeros_like(z))).sum() / z.shape[0]
