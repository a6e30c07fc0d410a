"""``tools/bench.py e2e`` on the CPU with tiny sizes: every row is measured, the released-code
baseline included, and the table and JSON say so (the GPU run is the same code with CUDA rows added)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "grid_cnn", "--image-size", "32", "--batch-size", "4", "--num-classes", "10", "--num-images", "12",
        "--steps", "2", "--warmup", "1", "--workers", "0", "--k-teacher-steps", "2", "--k-student-steps", "1"]
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


def test_e2e_bench_prints_every_row_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    result = subprocess.run([sys.executable, "tools/bench.py", "e2e", "--device", "cpu", *TINY, "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
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
