"""Human-facing output: the final metrics table of a run."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_metrics_table(summary: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        elif isinstance(value, (int, str)):
            table.add_row(key, str(value))
    Console().print(table)
