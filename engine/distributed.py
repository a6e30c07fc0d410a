"""Process-group setup (torchrun's or SLURM's environment), device choice, collectives the trainer
needs at its log, switch and eval points, and the ``--gpus N`` re-launch (docs/CLUSTERS.md)."""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
from torch import nn

# Signals the launcher forwards to the workers: torchrun's default set plus SIGUSR1, SLURM's
# pre-emption warning, which the trainer handles like SIGTERM.
LAUNCHER_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
DEFAULT_MASTER_PORT = 29500


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
        index = _local_cuda_index(local_rank) if preference == "cuda" else torch.device(preference).index
        return torch.device("cuda", index)
    if preference != "cpu":
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {preference!r}")
    return torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """The device a single-process command (mile-predict, mile-eval) runs on: ``auto`` is CUDA where
    there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _local_cuda_index(local_rank: int) -> int:
    """The local rank's GPU. A launcher that gives each task one GPU of its own (SLURM's
    --gpus-per-task=1 sets CUDA_VISIBLE_DEVICES per task) leaves each process one visible device,
    number 0, whatever its local rank."""
    return 0 if local_rank > 0 and torch.cuda.device_count() == 1 else local_rank


# -- the environment -----------------------------------------------------------------------------


def slurm_environment(env: dict[str, str]) -> dict[str, str]:
    """The torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) of a
    process that ``srun`` started directly, one task per GPU; empty when torchrun set them already
    (RANK present), outside ``srun``, or for a single task. MASTER_ADDR defaults to the first host of
    the step's node list, MASTER_PORT to a port derived from the job id (two jobs sharing a node do
    not collide); set either to override."""
    if "RANK" in env or "SLURM_PROCID" not in env:
        return {}
    world_size = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1")
    if world_size <= 1:
        return {}
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    job_port = DEFAULT_MASTER_PORT + int(env.get("SLURM_JOB_ID", "0")) % 10000
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes) or "127.0.0.1",
        "MASTER_PORT": env.get("MASTER_PORT") or str(job_port),
    }


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[03-05,09],cpu1" -> "gpu03", "a,b" -> "a"."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    if not match or not match.group(1) and not match.group(2):
        return ""
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def init_distributed(device_preference: str, cuda_graphs: bool = False) -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set) or by ``srun``
    (SLURM variables, mapped by ``slurm_environment``), else run as a single process."""
    os.environ.update(slurm_environment(dict(os.environ)))
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
        if device.type == "cuda" and cuda_graphs:
            # The PyTorch CUDA-graph notes on DDP: capturing the all-reduce needs the process
            # group's asynchronous error handling off. A dead peer is still caught: torchrun's agent
            # watches the workers and stops the whole group when one fails.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = attempt_store(world_size)
        if store is None:
            torch.distributed.init_process_group(backend=backend)
        else:
            torch.distributed.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
        global _JOINED
        _JOINED = True
    return DistInfo(rank, world_size, local_rank, device)


def attempt_store(world_size: int) -> torch.distributed.Store | None:
    """The process group's store for a worker group that torchrun started: its agent's store, under
    a prefix of its own per restart attempt; None elsewhere (the default rendezvous applies).

    torchrun's agent keeps one store for every attempt, and the process group writes its members'
    addresses under the same keys each time: a restarted group could read the dead group's
    addresses and try to connect to processes that are gone ("Connection refused", or a hang;
    seen in about half of the restarts here)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent_store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timedelta(minutes=30),
    )
    return torch.distributed.PrefixStore(f"mile/attempt-{attempt}", agent_store)


_JOINED = False  # whether this process joined a process group (set once, never reset)


def joined_process_group() -> bool:
    return _JOINED


def exit_worker(code: int) -> NoReturn:
    """End a process that joined a process group with ``os._exit``, after flushing its output.

    The process group's threads (gloo's workers and I/O loop, NCCL's watchdog) outlive
    ``destroy_process_group``: DDP's reducer keeps the group alive. If one of them needs the GIL
    while the interpreter finalizes (to release a tensor or run a callback), CPython ends that
    thread with ``pthread_exit``, whose unwinding through a C++ ``noexcept`` destructor calls
    ``std::terminate``: "terminate called without an active exception", SIGABRT, a run that had
    completed reported as crashed. Skipping finalization leaves nothing for those threads to race
    with; everything that needs an orderly end (checkpoint writes, TensorBoard files, loader
    workers, the process group itself) has ended before this is called."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said on it
            pass
    os._exit(code)


def shutdown_distributed(completed: bool) -> None:
    """Leave the process group. After a completed run every rank waits for the others first (a rank
    leaving early closes connections its peers may still read from); after an error it does not,
    so the failing rank exits and torchrun stops the rest instead of everyone hanging."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if completed:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# -- collectives at log, switch and eval points ------------------------------------------------------


@torch.no_grad()
def broadcast_buffers(module: nn.Module, source_rank: int = 0) -> None:
    """Give every rank ``source_rank``'s buffers (BatchNorm statistics): one broadcast per dtype.

    Without SyncBatchNorm each rank's running statistics follow its own share of the batches; the
    teacher snapshot and the evaluation read them, so the trainer makes them agree first. A no-op
    outside a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    buffers = [b for b in module.buffers() if b.numel()]
    for dtype in dict.fromkeys(b.dtype for b in buffers):
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in group])
        torch.distributed.broadcast(flat, src=source_rank)
        pieces = flat.split([b.numel() for b in group])
        torch._foreach_copy_(group, [piece.view_as(b) for piece, b in zip(pieces, group)])


def gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values``, by rank (one all-gather); ``[values]`` outside a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [list(values)]
    local = torch.tensor(values, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, local)
    return [row.tolist() for row in gathered]  # SYNC: log point


# -- launching -------------------------------------------------------------------------------------


def torchrun_command(num_gpus: int, argv: list[str]) -> list[str]:
    """The command that re-runs this invocation on ``num_gpus`` local GPUs, under ``engine.commands.launch``
    (torchrun, forwarding SIGUSR1 too and exiting with 128 + the signal that stopped the job)."""
    available = torch.cuda.device_count()
    if available < num_gpus:
        raise ValueError(f"--gpus {num_gpus}: only {available} CUDA device(s) visible")
    return [
        sys.executable,
        "-m",
        "engine.commands.launch",
        "--standalone",
        f"--nproc_per_node={num_gpus}",
        "-m",
        "engine.commands.run",
        *argv,
    ]
