"""Helpers the test files share (fixtures live in conftest.py): the repository root, the one-process
CPU rank, a tiny training config on the digit grid, a run's checkpoint read back, the engine-run CLI
as a user starts it, and a run stopped by SIGTERM."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from engine.checkpoint import read_checkpoint
from engine.config import RunConfig, build_config
from engine.distributed import DistInfo
from engine.trainer import RunInterrupted, Trainer
from shards.sources import digits_grid
from shards.writer import WriterSettings, write_split

REPO = Path(__file__).resolve().parents[1]
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def write_grid(root: Path) -> Path:
    """The digit grid most engine tests train on: 640 train and 160 val images, 200 per shard."""
    config = digits_grid.GridConfig(train_size=640, val_size=160, seed=3)
    for split, items in digits_grid.grid_items(config).items():
        write_split(
            root, digits_grid.grid_spec(split, config), items, WriterSettings(progress=False, max_samples_per_shard=200)
        )
    return root


def tiny_config(root: Path, out: Path, **overrides) -> RunConfig:
    values = {
        "data.root": str(root),
        "data.num_workers": 0,
        "data.backend": "torch",
        "method.name": "mile",
        "method.k_teacher_steps": 3,
        "method.k_student_steps": 2,
        "num_steps": 12,
        "global_batch_size": 32,
        "eval_every": 6,
        "log_every": 2,
        "checkpoint_every": 4,
        "out_dir": str(out),
        "device": "cpu",
        **overrides,
    }
    return build_config({}, values)


def checkpoint_state(out: Path) -> dict:
    """The components of a run's checkpoint, read as a user would (weights_only, digest checked)."""
    return read_checkpoint(out / "checkpoints" / "last.pt")["components"]


def checkpoint_step(out: Path) -> int:
    return checkpoint_state(out)["progress"]["step"]


def learner_weights(out: Path) -> dict[str, torch.Tensor]:
    return checkpoint_state(out)["learner"]


def run_stopped_by_sigterm(config: RunConfig, stop_at: int) -> None:
    """Train ``config`` and send SIGTERM right after step ``stop_at``: the run checkpoints and stops."""
    trainer = Trainer(config, CPU)
    original_step = trainer._timed_step

    def step_then_signal(batch, stats):
        original_step(batch, stats)
        if trainer.step == stop_at:
            signal.raise_signal(signal.SIGTERM)

    trainer._timed_step = step_then_signal  # type: ignore[method-assign]  # a signal mid-run, on purpose
    with pytest.raises(RunInterrupted) as stopped:
        trainer.run()
    assert stopped.value.exit_code == 128 + signal.SIGTERM


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``engine-run ARGS`` in a fresh process, as a user starts it."""
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


class CommandTimedOut(BaseException):
    """A command run in this process went past its time limit (a BaseException, so that no
    ``except Exception`` of the command turns it into an exit status)."""


def run_cli_in_process(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``engine-run ARGS`` in this process, through ``engine.cli.run_command`` as the installed command
    runs it: exit status and what it printed, as ``run_cli`` returns them, without a fresh
    interpreter's seconds of imports. An exception the command does not turn into an exit status
    propagates (where a fresh process would print its traceback); so does a re-launch (``--gpus N``),
    which would replace this process, and a command that runs past ``timeout`` seconds."""
    from unittest import mock

    from engine import cli

    def no_exec(path: str, argv: list[str]) -> None:
        raise AssertionError(f"engine-run tried to become {argv}")

    def timed_out(signum: int, frame: object) -> None:
        raise CommandTimedOut(f"engine-run {' '.join(args)} ran past {timeout} s")

    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with (
            mock.patch.object(sys, "argv", ["engine-run", *args]),
            mock.patch.object(cli.os, "execv", no_exec),
            redirect_stdout(out),
            redirect_stderr(err),
        ):
            code = cli.run_command()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return subprocess.CompletedProcess(["engine-run", *args], code, out.getvalue(), err.getvalue())
