"""SyncBatchNorm for the learner (``--sync-bn``): BatchNorm statistics over the global batch.

On CUDA this is ``torch.nn.SyncBatchNorm``. PyTorch's refuses CPU tensors, so CPU runs under gloo
(the tests, a laptop) get ``GlooSyncBatchNorm``: the same mathematics from two all-reduced sums per
channel, differentiable through ``torch.distributed.nn.functional.all_reduce``. Outside a process
group, or in eval mode, both are plain BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn


def _distributed_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover every rank's batch (equal batch sizes, as in
    training, where every rank holds batch_size / world_size images)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        world_size = _distributed_world()
        if not (self.training and world_size > 1):
            return super().forward(images)
        from torch.distributed.nn.functional import all_reduce

        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        count = images.numel() // images.shape[1] * world_size
        # Two passes, as BatchNorm computes them (E[x^2] - E[x]^2 loses digits). The all-reduce is
        # differentiable: its backward sums the gradient over the ranks, which is how the other
        # ranks' losses reach this rank's images through the shared statistics.
        mean = all_reduce(images.sum(dims)) / count
        centred = images - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / count  # biased: what BatchNorm normalises with
        self._update_running_stats(mean.detach(), var.detach(), count)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        if not self.track_running_stats:
            return
        tracked, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
        assert tracked is not None and running_mean is not None and running_var is not None  # track_running_stats
        tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(tracked)
        running_mean.lerp_(mean, momentum)
        running_var.lerp_(var * count / (count - 1), momentum)  # unbiased: what BatchNorm keeps


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """``module`` with every BatchNorm2d synchronised across ranks. Like PyTorch's conversion, the
    new layers hold the very parameter and buffer tensors of the old ones."""
    if device_type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        synced = GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            setattr(synced, name, tensor)
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child))
    return module
