"""Process-group setup from torchrun's environment, device choice, and the ``--gpus N`` re-launch."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def choose_device(preference: str, local_rank: int) -> torch.device:
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {preference}: no CUDA device is available (use --device cpu)")
        return torch.device("cuda", local_rank if preference == "cuda" else torch.device(preference).index)
    if preference != "cpu":
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {preference!r}")
    return torch.device("cpu")


def init_distributed(device_preference: str) -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set), else single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_preference, local_rank)
    if device.type == "cuda":
        # Every CUDA run, one process too: streams, events and graph captures are made on the
        # *current* device, so --device cuda:1 without this would capture on device 0's streams
        # while the tensors live on device 1 (an empty graph whose replays do nothing).
        torch.cuda.set_device(device)
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return DistInfo(rank, world_size, local_rank, device)


def shutdown_distributed(completed: bool) -> None:
    """Leave the process group. After a completed run every rank waits for the others first (a rank
    leaving early closes connections its peers may still read from); after an error it does not,
    so the failing rank exits and torchrun stops the rest instead of everyone hanging."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if completed:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def torchrun_command(num_gpus: int, argv: list[str]) -> list[str]:
    """The command that re-runs this invocation under torchrun on ``num_gpus`` local GPUs."""
    available = torch.cuda.device_count()
    if available < num_gpus:
        raise ValueError(f"--gpus {num_gpus}: only {available} CUDA device(s) visible")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_gpus}", "-m", "engine.cli", *argv]
