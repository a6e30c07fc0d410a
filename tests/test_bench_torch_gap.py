"""``tools/bench.py torch-gap`` with tiny sizes on the CPU: every row is measured, each with its
within-round ratio to the plain torchvision DataLoader (the full run is documented in
docs/PERFORMANCE.md; no timing is asserted here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_bench

TINY = ["--num-images", "16", "--repeats", "1", "--warmup", "0", "--batch-size", "8", "--image-size", "32"]


@pytest.mark.slow
def test_torch_gap_bench_measures_every_row(tmp_path: Path) -> None:
    from benchmarks.torch_gap import HOST_SIDE, PLAIN, PROJECT, variants

    out = tmp_path / "gap.json"
    report, stdout = run_bench("torch-gap", TINY, out)
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == [PROJECT, PLAIN] + [v.name for v in variants()]
    for name, row in rows.items():
        assert len(row["images_per_s"]) == 1 and min(row["images_per_s"]) > 0, row
        assert row["median_ratio_to_plain"] > 0 and row["median_main_cpu_ms_per_image"] >= 0
        assert name in stdout
    assert rows[PLAIN]["ratio_to_plain"] == [1.0]
    assert rows[HOST_SIDE]["stand_in_transform_us"] > 0


def test_rows_that_name_no_row_are_refused() -> None:
    from benchmarks.loaders import select_rows

    factories = [("project torch backend", list), ("plain row", list), ("project, gc every epoch", list)]
    assert [name for name, _ in select_rows(factories, ("gc",), "plain row")] == [
        "plain row",
        "project, gc every epoch",
    ]
    assert len(select_rows(factories, (), "plain row")) == 3
    with pytest.raises(ValueError, match=r"--rows 'gx' names no row; the rows: project torch backend; plain row"):
        select_rows(factories, ("gc", "gx"), "plain row")
