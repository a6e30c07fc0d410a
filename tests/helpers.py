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
        "arch": "grid_cnn",  # the grid's model and size, set here: the schema's defaults are photo-sized
        "data.image_size_px": 24,
        "data.augment": False,
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
        [sys.executable, "-m", "engine.commands.run", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


class CommandTimedOut(BaseException):
    """A command run in this process went past its time limit (a BaseException, so that no
    ``except Exception`` of the command turns it into an exit status)."""


# Handlers a command may install (engine-run's trainer, make-shards' SIGTERM): put back afterwards.
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGALRM)


def run_in_process(target: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m TARGET ARGS`` (a module) or ``python TARGET ARGS`` (a ``.py`` script, relative to
    the repository) run in this process as the interpreter would run it (``__main__``, ``sys.argv``,
    the repository as working folder): its exit status and what it printed, as ``subprocess.run``
    returns them, without a fresh interpreter's seconds of imports. For what a command does with its
    arguments, files and errors; signals, exits and launchers need a real process. An exception the
    command lets through propagates (where a process would print its traceback), and so do a command
    that runs past ``timeout`` seconds and an exec (``engine-run --gpus N``), which would replace
    this process."""
    import os
    import runpy
    import warnings
    from unittest import mock

    def no_exec(path: str, argv: list[str]) -> None:
        raise AssertionError(f"{target} tried to become {argv}")

    def timed_out(signum: int, frame: object) -> None:
        raise CommandTimedOut(f"{target} {' '.join(args)} ran past {timeout} s")

    script = target.endswith(".py")
    argv = [str(REPO / target) if script else target, *args]
    out, err, code = io.StringIO(), io.StringIO(), 0
    handlers = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    cwd = os.getcwd()
    signal.signal(signal.SIGALRM, timed_out)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        os.chdir(REPO)
        with (
            mock.patch.object(sys, "argv", argv),
            mock.patch.object(os, "execv", no_exec),
            redirect_stdout(out),
            redirect_stderr(err),
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)  # runpy's
            try:
                if script:
                    runpy.run_path(argv[0], run_name="__main__")
                else:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
            except SystemExit as finished:
                code = finished.code if isinstance(finished.code, int) else (0 if finished.code is None else 1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        os.chdir(cwd)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_cli_in_process(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``engine-run ARGS`` in this process (``run_in_process``): what ``run_cli`` returns, seconds sooner."""
    return run_in_process("engine.commands.run", *args, timeout=timeout)


def run_bench(subcommand: str, args: list[str], out: Path) -> tuple[dict, str]:
    """``tools/bench.py SUBCOMMAND ARGS --out OUT`` in a subprocess (it forks loader workers): the
    JSON it wrote and its stdout; a failure shows the end of its stderr."""
    import json

    result = subprocess.run(
        [sys.executable, "tools/bench.py", subcommand, *args, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


# The flags of every CLI run in the tests: CPU, the torch loader, no worker processes.
CPU_FLAGS = ("--device", "cpu", "--loader", "torch", "--workers", "0")
