"""``engine-run`` with test probes, for tests that need a real process (torchrun, SIGKILL).

    python tests/dist_worker.py ENGINE-RUN-ARGS...          (or as torchrun's script)

It runs ``engine.commands.run.main`` unchanged after installing, on the trainer it builds, the probes named by
environment variables:

- ``MILE_TEST_DIGESTS=DIR``: after every teacher snapshot, append ``step digest`` of the teacher's
  BatchNorm statistics to DIR/teacher-rank{R}.txt, and before every buffer synchronisation the
  learner's own to DIR/learner-rank{R}.txt (what the ranks held before they were made to agree);
- ``MILE_TEST_KILL=RANK:STEP``: the first worker group's rank RANK kills itself with SIGKILL after
  step STEP (an elastic restart, TORCHELASTIC_RESTART_COUNT > 0, runs on);
- ``MILE_TEST_STEP_SLEEP=SECONDS``: sleep after every step (a run slow enough to signal mid-way);
- ``MILE_TEST_SLOW_WRITE=SECONDS``: every checkpoint write after the first sleeps that long between
  writing its temporary file and publishing it (a write to kill half-way).
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import engine.checkpoint  # noqa: E402
from engine.trainer import Trainer  # noqa: E402


def tensors_digest(tensors: list[torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()[:16]


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def install_digests(trainer: Trainer, folder: Path) -> None:
    engine = trainer.engine
    assert engine.teacher is not None  # the distributed tests run MILe
    teacher_buffers = list(engine.teacher.buffers())
    original_apply, original_sync = engine.switch.apply, engine.sync_buffers

    def write(name: str, tensors: list[torch.Tensor]) -> None:
        with open(folder / f"{name}-rank{rank()}.txt", "a") as handle:
            handle.write(f"{trainer.step} {tensors_digest(tensors)}\n")

    def apply(actions):  # after the snapshot: what the teacher computes pseudo-labels with
        original_apply(actions)
        if any(action.value == "snapshot_teacher" for action in actions):
            write("teacher", teacher_buffers)

    def sync_buffers():  # before the broadcast: each rank's own statistics
        write("learner", list(engine.learner.buffers()))
        original_sync()

    engine.switch.apply, engine.sync_buffers = apply, sync_buffers  # type: ignore[method-assign]  # probes


def install_kill(trainer: Trainer, target_rank: int, after_step: int) -> None:
    if rank() != target_rank or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    original = trainer._timed_step

    def step_then_die(batch, stats):
        original(batch, stats)
        if trainer.step == after_step:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer._timed_step = step_then_die  # type: ignore[method-assign]  # the fault under test


def install_step_sleep(trainer: Trainer, seconds: float) -> None:
    original = trainer._timed_step

    def slow_step(batch, stats):
        original(batch, stats)
        time.sleep(seconds)

    trainer._timed_step = slow_step  # type: ignore[method-assign]  # a slow rank, on purpose


def install_slow_write(seconds: float) -> None:
    real_save, calls = torch.save, {"n": 0}

    def slow_save(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 1:
            handle.flush()
            time.sleep(seconds)  # the temporary file is written; publishing it waits

    engine.checkpoint.torch.save = slow_save  # type: ignore[assignment]  # a slow disk, on purpose


def install_probes() -> None:
    original_init = Trainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if folder := os.environ.get("MILE_TEST_DIGESTS"):
            install_digests(self, Path(folder))
        if kill := os.environ.get("MILE_TEST_KILL"):
            target_rank, after_step = (int(x) for x in kill.split(":"))
            install_kill(self, target_rank, after_step)
        if sleep := os.environ.get("MILE_TEST_STEP_SLEEP"):
            install_step_sleep(self, float(sleep))

    Trainer.__init__ = init  # type: ignore[method-assign]  # installs the probes above
    if seconds := os.environ.get("MILE_TEST_SLOW_WRITE"):
        install_slow_write(float(seconds))


if __name__ == "__main__":
    install_probes()
    from engine.commands.run import main

    sys.argv = ["engine-run", *sys.argv[1:]]
    main()
