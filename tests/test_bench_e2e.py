"""``tools/bench.py e2e`` on the CPU with tiny sizes: every row is measured, the released-code
baseline included, and the table and JSON say so (the GPU run is the same code with CUDA rows added)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--arch",
    "grid_cnn",
    "--image-size",
    "32",
    "--batch-size",
    "4",
    "--num-classes",
    "10",
    "--num-images",
    "12",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--workers",
    "0",
    "--k-teacher-steps",
    "2",
    "--k-student-steps",
    "1",
]
EXPECTED_ROWS = [
    ("loader alone", "torch backend (CPU decode)"),
    ("loader alone", "PIL + torchvision DataLoader (released code)"),
    ("engine alone", "engine teacher step (eager)"),
    ("engine alone", "engine student step (eager)"),
    ("phase switch", "engine snapshot_teacher (eager)"),
    ("phase switch", "engine save_student (eager)"),
    ("phase switch", "engine restore_student (eager)"),
    ("end to end", "torch backend (CPU decode) + engine (eager)"),
    ("released-code baseline", "PIL DataLoader + eager fp32 NCHW steps, deepcopy teacher"),
    ("phase switch", "baseline deepcopy teacher"),
]


@pytest.mark.slow
def test_e2e_bench_prints_every_row_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    result = subprocess.run(
        [sys.executable, "tools/bench.py", "e2e", "--device", "cpu", *TINY, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert not [r for r in rows if r["error"]], [r for r in rows if r["error"]]
    found = [(r["group"], r["name"]) for r in rows]
    for expected in EXPECTED_ROWS:  # DALI rows come on top where DALI imports
        assert expected in found, (expected, found)
        assert expected[1] in result.stdout
    for row in rows:
        assert row["ms_per_step"] > 0, row
        assert (row["images_per_s"] or 0) > 0 or row["group"] == "phase switch", row
        assert row["peak_gpu_mib"] is None  # CPU: no GPU memory, and telemetry says why it is absent
        assert row["telemetry"] is None or "unavailable" in row["telemetry"], row


# -- the GPU checks' code, run on the CPU (where CUDA-only parts are left out) ---------------------


@pytest.mark.slow
def test_gpu_check_functions_run_on_cpu(tmp_path: Path) -> None:
    """The phase-switch timing, the decode comparison and the Trainer probe of tools/gpu_checks.sh,
    on the CPU: their code runs, and the decode comparison can tell different images apart."""
    import torch

    from benchmarks import gpu_checks
    from pipelines import build_loader
    from pipelines.contract import LoaderConfig

    cpu = torch.device("cpu")
    timings = gpu_checks.switch_timings("grid_cnn", 4, 24, 2, cpu)
    assert set(timings["actions"]) == {"snapshot_teacher", "save_student", "restore_student"}
    assert timings["sync_error"] is None and timings["allocated_bytes_growth"] == 0 and timings["deepcopy_ms"] > 0

    shards = gpu_checks.photo_shards(tmp_path / "photos", 24, num_classes=4)
    for name, (reference, candidate, std) in gpu_checks.decode_pairs(shards, 8, 32, cpu).items():
        same = gpu_checks.compare_loaders(reference, candidate, std)
        assert same["batches"] == 3 and same["mean_abs_diff"] == 0 and same["labels_equal"] and same["channels_last"], (
            name,
            same,
        )
    loaders = [
        build_loader(
            shards, "bench", LoaderConfig(batch_size=8, image_size_px=32, train=train, backend="torch", num_workers=0)
        )
        for train in (False, True)
    ]  # eval centre crops vs random crops of the same images
    eval_loader, train_loader = loaders
    different = gpu_checks.compare_loaders(eval_loader, train_loader, LoaderConfig().std)
    assert different["mean_abs_diff"] > gpu_checks.PIXEL_TOLERANCE

    result = gpu_checks.hot_loop_check(
        shards,
        tmp_path / "run",
        arch="grid_cnn",
        image_size=32,
        batch_size=8,
        steps=4,
        workers=0,
        backend="torch",
        device=cpu,
    )
    assert result.steps_checked == 3 and result.engine_sync_error is None and not result.loader_syncs
    # observed through the trainer's hooks: its own log point, images/s from wall time with the data wait beside it
    [record] = result.log_records
    assert record["step"] == 4 and record["images_per_s"] > 0 and 0 <= record["data_wait_s"] <= record["train_seconds"]


def test_dali_buffer_lifetime_check_on_cpu(tmp_path: Path) -> None:
    """G2's check with DALI's CPU pipeline, bf16 batches (cast from DALI's float32 output) and float32
    ones (DALI's own buffers): a pass that holds batches as the trainer does gives the batches of a
    synchronised pass, and two synchronised passes agree (else the check could not tell)."""
    import pytest
    import torch

    from benchmarks import gpu_checks
    from pipelines import dali_import_error

    if dali_import_error():
        pytest.skip(f"DALI does not import: {dali_import_error()}")
    shards = gpu_checks.photo_shards(tmp_path / "photos", 16 * 7, num_classes=4)
    for dtype in (torch.bfloat16, torch.float32):
        result = gpu_checks.dali_lifetime(shards, 6, dtype, torch.device("cpu"))
        assert result == {"batches": 6, "repeatable": True, "changed": []}, dtype


def test_ddp_graph_check_runs_on_cpu() -> None:
    """G8's code under a gloo process group of one: DDP builds with the capture options, the
    lockstep comparison and the timings run (no graphs on a CPU: graphed and eager are the same
    steps, so every error is 0), and the environment is left as it was."""
    import os

    import torch

    from benchmarks import gpu_checks

    before = {name: os.environ.get(name) for name in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    result = gpu_checks.ddp_graph_comparison("grid_cnn", 24, 8, 4, 2, torch.device("cpu"))
    assert result["capture"]["ddp graphed"].startswith("device is cpu") and result["errors"] == [0.0] * 4
    assert result["step_ms"]["ddp graphed"] > 0 and result["slowdown"] > 0
    # the bf16 compression hook rounds every DDP gradient to bf16; the plain engine keeps fp32 ones
    inexact = result["bf16_inexact_gradient_fraction"]
    assert inexact["ddp graphed"] == 0 and inexact["plain graphed"] > 0.5, inexact
    assert result["nccl_kernel_nodes"] == {"probe (one all-reduce, ReduceOp.AVG)": None}  # no NCCL on a CPU
    assert not torch.distributed.is_initialized()
    assert {name: os.environ.get(name) for name in before} == before
