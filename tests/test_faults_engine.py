"""Faults and hostile inputs against engine-run: no hang, no code run from a checkpoint, no silent
corruption, a run folder consistent with its checkpoint, and refusals before any work."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from helpers import CPU, CPU_FLAGS, checkpoint_step, run_cli_in_process, tiny_config

from engine.checkpoint import CheckpointError, read_checkpoint
from engine.run_folder import read_metrics
from engine.trainer import NonFiniteLoss, Trainer


def finished_run(grid_root: Path, out: Path, **overrides) -> Path:
    Trainer(tiny_config(grid_root, out, num_steps=4, eval_every=4, checkpoint_every=2, **overrides), CPU).run()
    return out / "checkpoints" / "last.pt"


# -- 1. a batch larger than the split is refused, not spun on -----------------------------------


def test_batch_larger_than_the_split_is_refused_before_work(grid_root: Path, tmp_path: Path) -> None:
    result = run_cli_in_process(
        "--data", str(grid_root), "--batch-size", "5000", "--out", str(tmp_path / "out"), "--device", "cpu", timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "--batch-size" in result.stderr and "5000" in result.stderr and "640 samples" in result.stderr
    assert not (tmp_path / "out").exists()


# -- 4. checkpoints never run code; damage is named ---------------------------------------------


class _Payload:
    marker = ""  # the file unpickling would create; set by the test

    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_a_crafted_checkpoint_does_not_run_code(grid_root: Path, tmp_path: Path) -> None:
    path = finished_run(grid_root, tmp_path / "run")
    _Payload.marker = str(tmp_path / "pwned")
    with open(path, "wb") as handle:
        torch.save({"format": 2, "components": _Payload()}, handle, pickle_module=pickle)
    result = run_cli_in_process("--out", str(tmp_path / "run"), "--resume")
    assert result.returncode == 2, result.stderr
    assert not (tmp_path / "pwned").exists()
    assert str(path) in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_checkpoints_are_named_not_loaded(grid_root: Path, tmp_path: Path, damage: str) -> None:
    path = finished_run(grid_root, tmp_path / "run")
    data = bytearray(path.read_bytes())
    if damage == "flip":  # inside one of the learner's tensors: unpickles fine, weights change
        state = read_checkpoint(path)["components"]["learner"]
        first = (
            next(t for t in state.values() if t.dim() == 1 and t.numel() >= 16 and t.is_floating_point())
            .numpy()
            .tobytes()
        )
        offset = bytes(data).find(first[:64])
        assert offset > 0
        data[offset + 10] ^= 0xFF
    elif damage == "truncate":
        del data[len(data) // 2 :]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(path)):
        read_checkpoint(path)
    result = run_cli_in_process("--out", str(tmp_path / "run"), "--resume")
    assert result.returncode == 2 and str(path) in result.stderr and "Traceback" not in result.stderr


def test_checkpoint_loads_with_plain_weights_only_torch_load(grid_root: Path, tmp_path: Path) -> None:
    payload = torch.load(finished_run(grid_root, tmp_path / "run"), weights_only=True)
    assert payload["format"] == 2 and payload["components"]["progress"]["step"] == 4
    assert set(payload["components"]) == {"learner", "teacher", "optimizer", "phase_switch", "progress", "rng"}


def test_an_older_checkpoint_format_is_refused_clearly(grid_root: Path, tmp_path: Path) -> None:
    path = finished_run(grid_root, tmp_path / "run")
    torch.save({"format": 1, "config": {}, "components": {}, "digest": ""}, path)
    with pytest.raises(CheckpointError, match="format 1; this release reads format 2"):
        read_checkpoint(path)


# -- 6. --resume with changed flags -------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--rho", "0.4"),
        ("--method", "sigmoid"),
        ("--batch-size", "16"),
        ("--k-teacher-steps", "5"),
        ("--seed", "7"),
        ("--arch", "resnet18"),
    ],
)
def test_resume_refuses_changes_that_alter_the_run(grid_root: Path, tmp_path: Path, flag: str, value: str) -> None:
    out = tmp_path / "run"
    Trainer(
        tiny_config(grid_root, out, num_steps=4, eval_every=4, checkpoint_every=2), CPU
    )  # folder prepared, nothing trained
    finished_run(grid_root, tmp_path / "done")
    before = (tmp_path / "done" / "config.toml").read_bytes()
    result = run_cli_in_process("--out", str(tmp_path / "done"), "--resume", flag, value)
    assert result.returncode == 2, result.stderr
    assert "--resume cannot change" in result.stderr and flag in result.stderr
    assert (tmp_path / "done" / "config.toml").read_bytes() == before
    assert run_cli_in_process("--out", str(tmp_path / "done"), "--resume").returncode == 0  # plain --resume still works


def test_resume_allows_safe_changes(grid_root: Path, tmp_path: Path) -> None:
    finished_run(grid_root, tmp_path / "done")
    result = run_cli_in_process("--out", str(tmp_path / "done"), "--resume", "--eval-every", "2", "--steps", "6")
    assert result.returncode == 0, result.stderr
    assert checkpoint_step(tmp_path / "done") == 6
    assert "eval_every = 2" in (tmp_path / "done" / "config.toml").read_text()


# -- 7. the metrics stream stays consistent with the checkpoint --------------------------------


def test_restart_without_a_checkpoint_does_not_interleave(grid_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text('{"project": "mile"}\n')  # an earlier start's mark: the folder is a run's
    (out / "metrics.jsonl").write_text(
        '{"kind": "train", "step": 5, "loss": 1.0}\n{"kind": "train", "step": 10, "loss": 0.9}\n'
    )
    Trainer(tiny_config(grid_root, out, num_steps=4, eval_every=4), CPU).run()
    steps = [(r["kind"], r["step"]) for r in read_metrics(out / "metrics.jsonl")]
    assert steps == sorted(steps, key=lambda s: s[1]) and len(steps) == len(set(steps))
    assert all(r.get("loss") != 0.9 for r in read_metrics(out / "metrics.jsonl"))


def test_resuming_a_finished_run_appends_nothing(grid_root: Path, tmp_path: Path) -> None:
    finished_run(grid_root, tmp_path / "run")
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    for _ in range(2):
        assert run_cli_in_process("--out", str(tmp_path / "run"), "--resume").returncode == 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_a_torn_last_metrics_line_is_dropped_on_resume(grid_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = tiny_config(grid_root, out, num_steps=6, eval_every=6, checkpoint_every=2)
    Trainer(config, CPU).run()
    (out / "summary.json").unlink()  # as if it died after its last checkpoint...
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "st')  # ...in the middle of a line
    summary = Trainer(config, CPU, resume=True).run()
    records = read_metrics(out / "metrics.jsonl")
    assert summary["step"] == 6 and all("kind" in r for r in records)


# -- 8. non-finite weights are never checkpointed ------------------------------------------------


def test_non_finite_batchnorm_statistics_stop_the_run_before_the_checkpoint(grid_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(grid_root, out, num_steps=6, checkpoint_every=2, eval_every=100), CPU)
    original = trainer._timed_step

    def blow_up_late(batch, stats):
        original(batch, stats)
        if trainer.step == 3:
            bn = next(m for m in trainer.engine.learner.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))

    trainer._timed_step = blow_up_late  # type: ignore[method-assign]  # the fault under test
    with pytest.raises(
        NonFiniteLoss,
        match="non-finite weights or BatchNorm statistics after step 4; stopping; the last good checkpoint",
    ):
        trainer.run()
    assert checkpoint_step(out) == 2


def test_non_finite_message_says_when_no_checkpoint_exists(grid_root: Path, tmp_path: Path, monkeypatch) -> None:
    import engine.steps

    monkeypatch.setattr(engine.steps, "bce_one_hot", lambda logits, labels: logits.sum() * float("nan"))
    with pytest.raises(NonFiniteLoss, match="no checkpoint had been written yet"):
        Trainer(tiny_config(grid_root, tmp_path / "run", **{"method.name": "sigmoid"}, log_every=1), CPU).run()


# -- 1. a long wait for data is interruptible -------------------------------------------------


def test_sigterm_interrupts_a_long_wait_for_the_first_batch(grid_root: Path, tmp_path: Path) -> None:
    import signal
    import threading
    import time

    from engine.trainer import RunInterrupted

    trainer = Trainer(tiny_config(grid_root, tmp_path / "run"), CPU)

    def stalled_epoch(epoch: int, start_batch: int = 0):
        time.sleep(60)  # a loader that takes a minute to produce its first batch
        yield from ()

    trainer.train_loader.epoch = stalled_epoch  # type: ignore[method-assign]  # the fault under test
    main_thread = threading.get_ident()
    threading.Timer(0.5, lambda: signal.pthread_kill(main_thread, signal.SIGTERM)).start()
    started = time.monotonic()
    with pytest.raises(RunInterrupted) as stopped:
        trainer.run()
    assert time.monotonic() - started < 10
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert checkpoint_step(tmp_path / "run") == 0


# -- 5. damaged shards: named at start with --verify-data, named mid-run otherwise ---------------


def damaged_copy(grid_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the grid whose first train shard has one JPEG's bytes overwritten (same length,
    index still consistent): the size check at start cannot see it."""
    import shutil

    from shards.manifest import load_split
    from shards.tar_io import read_index

    root = tmp_path / "grid"
    shutil.copytree(grid_root, root)
    record = load_split(root, "train").shards[0]
    member = next(m for sample in read_index(root / record.index_path) for m in sample if m.name.endswith(".jpg"))
    with open(root / record.path, "r+b") as handle:
        handle.seek(member.offset + 2)
        handle.write(b"\x00" * (member.size - 4))
    return root, root / record.path


def test_verify_data_names_a_damaged_shard_before_training(grid_root: Path, tmp_path: Path) -> None:
    root, shard = damaged_copy(grid_root, tmp_path)
    result = run_cli_in_process(
        "--data", str(root), "--verify-data", "--out", str(tmp_path / "run"), "--device", "cpu", "--loader", "torch"
    )
    assert result.returncode == 2 and shard.name in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_damaged_sample_mid_run_stops_cleanly_naming_the_shard(grid_root: Path, tmp_path: Path) -> None:
    root, shard = damaged_copy(grid_root, tmp_path)
    result = run_cli_in_process(
        "--data",
        str(root),
        "--out",
        str(tmp_path / "run"),
        *CPU_FLAGS,
        "--steps",
        "60",
        "--batch-size",
        "32",
        "--warmup-steps",  # MILe imitates within the 60 steps (the grid's warm-up is 400)
        "0",
        "--k-teacher-steps",
        "20",
        "--k-student-steps",
        "20",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert shard.name in result.stderr and "make-shards verify" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(grid_root: Path, tmp_path: Path, monkeypatch) -> None:
    import errno

    import engine.checkpoint

    out = tmp_path / "run"
    trainer = Trainer(tiny_config(grid_root, out, num_steps=8, checkpoint_every=2, eval_every=100), CPU)
    real_save, calls = torch.save, {"n": 0}

    def save_until_full(obj, handle, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(handle.name))
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(engine.checkpoint.torch, "save", save_until_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.run()
    monkeypatch.setattr(engine.checkpoint.torch, "save", real_save)
    assert checkpoint_step(out) == 2  # the earlier checkpoint, whole and checked
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["last.pt"]  # no temporary left behind
