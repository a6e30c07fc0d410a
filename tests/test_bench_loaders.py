"""``tools/bench.py loaders`` with tiny sizes on the CPU: the reference row of each backend's library
is measured in the same run, and each backend row carries its per-round ratio to it (the full run
is documented in docs/PERFORMANCE.md; no timing is asserted here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_bench

from pipelines import dali_import_error

TINY = ["--num-images", "16", "--repeats", "1", "--warmup", "0", "--batch-size", "8", "--image-size", "32"]


@pytest.mark.slow
def test_loader_bench_has_reference_rows_and_ratios(tmp_path: Path) -> None:
    from benchmarks.loaders import DALI_BACKEND, PIL_LOADER, PLAIN_DALI, PLAIN_TORCHVISION, TORCH_BACKEND

    out = tmp_path / "loaders.json"
    report, stdout = run_bench("loaders", TINY, out)
    rows = {row["name"]: row for row in report["results"]}
    expected = {TORCH_BACKEND: PLAIN_TORCHVISION, PLAIN_TORCHVISION: None, PIL_LOADER: None}
    if dali_import_error() is None:
        expected |= {DALI_BACKEND: PLAIN_DALI, PLAIN_DALI: None}
    assert set(expected) <= set(rows)
    for name, reference in expected.items():
        row = rows[name]
        assert row["error"] is None and len(row["images_per_s"]) == 1 and row["median_cpu_ms_per_image"] > 0, row
        assert row["reference"] == reference
        assert name in stdout
        if reference is None:
            assert row["ratio_to_reference"] == [] and row["median_ratio_to_reference"] is None
        else:
            assert len(row["ratio_to_reference"]) == len(row["cpu_ratio_to_reference"]) == 1
            assert row["median_ratio_to_reference"] > 0 and row["median_cpu_ratio_to_reference"] > 0
