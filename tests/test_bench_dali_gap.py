"""``tools/bench.py dali-gap`` with tiny sizes on the CPU: every row is measured and the JSON holds
each row's ratio to the plain DALI pipeline (the full run is documented in docs/PERFORMANCE.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, run_bench

from pipelines import dali_import_error

TINY = ["--num-images", "16", "--batch-size", "4", "--image-size", "32", "--repeats", "2", "--warmup", "0"]


@pytest.mark.slow
@pytest.mark.dali
@pytest.mark.skipif(dali_import_error() is not None, reason="DALI not importable")
def test_dali_gap_bench_measures_every_row(tmp_path: Path) -> None:
    from benchmarks.dali_gap import PLAIN, PROJECT, variants

    out = tmp_path / "gap.json"
    report, stdout = run_bench("dali-gap", TINY, out)
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == [PROJECT] + [v.name for v in variants()]
    for name, row in rows.items():
        assert len(row["images_per_s"]) == 2 and min(row["images_per_s"]) > 0, row
        assert row["median_ratio_to_plain"] > 0
        assert name in stdout
    assert rows[PLAIN]["ratio_to_plain"] == [1.0, 1.0]


@pytest.mark.slow
def test_dali_gap_bench_without_dali_says_why(tmp_path: Path) -> None:
    """Where DALI does not import, the subcommand fails with a message naming the reason."""
    code = (
        "import sys; sys.modules['nvidia.dali'] = None; sys.argv = ['bench.py', 'dali-gap']; "
        "import runpy; runpy.run_path('tools/bench.py', run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "dali-gap needs NVIDIA DALI" in result.stderr + result.stdout


@pytest.mark.slow
@pytest.mark.dali
@pytest.mark.skipif(dali_import_error() is not None, reason="DALI not importable")
def test_dali_gap_bench_runs_the_rows_asked_for(tmp_path: Path) -> None:
    from benchmarks.dali_gap import PLAIN, PROJECT

    out = tmp_path / "gap.json"
    report, _ = run_bench("dali-gap", [*TINY, "--rows", "backend, rebuild"], out)
    assert [row["name"] for row in report["rows"]] == [
        PROJECT,
        PLAIN,
        "project - per-epoch rebuild",
    ]
