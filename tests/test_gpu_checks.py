"""The GPU checks (tools/gpu_checks.sh, benchmarks/gpu_checks.py) where CUDA is absent: every check
reports SKIP or FAIL with a reason and writes its JSON at once, and the script keeps each check's
results in the folder that survives a device call as soon as that check ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from benchmarks import gpu_checks

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_checks.sh"
CHECKS = {  # id -> subcommand, in the script's order
    "G0": "env",
    "G1": "graph-tests",
    "G4": "e2e",
    "G5": "switch",
    "G3": "hot-loop",
    "G8": "ddp-graphs",
    "G6": "decode",
    "G2": "dali-lifetime",
    "G7": "dali-capture",
}


def test_every_check_reports_a_reason_and_writes_its_json_without_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    commands = {command.name for command in gpu_checks.app.registered_commands}
    assert commands == set(CHECKS.values()), "a check without a test here, or one the script does not run"
    runner = CliRunner()
    for check_id, command in CHECKS.items():
        result = runner.invoke(gpu_checks.app, [command, "--out", str(tmp_path)])
        [written] = tmp_path.glob(f"{check_id}-*.json")
        payload = json.loads(written.read_text())
        assert payload["result"] in ("SKIP", "FAIL") and payload["summary"], payload
        assert f"RESULT {check_id} {payload['result']} {payload['summary']}" in result.output
        assert result.exit_code == (1 if payload["result"] == "FAIL" else 0), result.output
    env = json.loads((tmp_path / "G0-env.json").read_text())
    assert env["result"] == "FAIL" and "CUDA not available" in env["summary"]


def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path / "kept"), "PYTHON": sys.executable, **extra}


def test_script_asks_for_a_budget() -> None:
    result = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True, env=script_env(Path("/")))
    assert result.returncode == 2 and "BUDGET_S" in result.stderr


def test_a_spent_budget_still_reports_every_check_in_order(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(SCRIPT), "5", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True,
        env=script_env(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "kept" / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == list(CHECKS)
    assert all("FAIL not run" in line for line in lines), lines


@pytest.mark.slow
def test_each_check_is_kept_as_soon_as_it_ends(tmp_path: Path) -> None:
    """The first check runs for real (no CUDA here: it fails with its reason); the second hangs, and
    the call is killed while it does: the first check's JSON and output are already kept."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\nif [[ " $* " == *" env "* ]]; then exec {sys.executable} "$@"; fi\nsleep 300\n')
    fake.chmod(0o755)
    kept = tmp_path / "kept"
    call = subprocess.Popen(
        ["bash", str(SCRIPT), "600", str(tmp_path / "work"), "G0", "G1"],
        cwd=REPO, env=script_env(tmp_path, PYTHON=str(fake)), stdout=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (kept / "summary.txt").is_file() and time.monotonic() < deadline and call.poll() is None:
            time.sleep(0.5)
    finally:
        os.killpg(call.pid, signal.SIGKILL)  # the device call's limit cuts it short
        call.wait()
    # what comes back from a device call: at most 8 files, so one tarball and the summary
    assert sorted(p.name for p in kept.iterdir()) == ["gpu-checks.tar.gz", "summary.txt"]
    with tarfile.open(kept / "gpu-checks.tar.gz") as tar:
        payload = json.loads(tar.extractfile("work/G0-env.json").read())  # type: ignore[union-attr]
        output = tar.extractfile("work/G0.txt").read().decode()  # type: ignore[union-attr]
    assert payload["result"] == "FAIL" and "CUDA not available" in payload["summary"]
    assert "RESULT G0 FAIL" in output
    assert (kept / "summary.txt").read_text().startswith("G0 FAIL")
