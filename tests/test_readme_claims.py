"""The README's claims about the methods quote docs/TUNING.md's tables: every figure in its "What
the demo shows" section must appear in TUNING.md's "Two grids" section, where the table it comes
from says on which data, settings and seeds it was measured. A figure edited in one place and not
the other fails here."""

from __future__ import annotations

import re

from helpers import REPO

FIGURE = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")  # 61.77, 0.25; not dates or versions like 2.4.0


def section(text: str, title: str) -> str:
    """From the heading ``title`` to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\s*$", text, re.MULTILINE)
    assert match, f"no section {title!r}"
    level = len(match.group(1))
    rest = text[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def test_every_figure_the_readme_quotes_is_in_the_tuning_tables() -> None:
    claims = section((REPO / "README.md").read_text(), "What the demo shows")
    tables = section((REPO / "docs" / "TUNING.md").read_text(), "Two grids")
    quoted = set(FIGURE.findall(claims))
    assert len(quoted) >= 20, "the section quotes the table's figures"
    missing = sorted(figure for figure in quoted if not re.search(rf"(?<![\w.]){re.escape(figure)}(?![\w.])", tables))
    assert not missing, f"README figures not in docs/TUNING.md's 'Two grids' section: {missing}"


def test_the_section_finder_stops_at_the_next_heading() -> None:
    text = "# A\n## B\nx 1.25\n### C\ny 2.50\n## D\nz 3.75\n"
    assert FIGURE.findall(section(text, "B")) == ["1.25", "2.50"]
    assert FIGURE.findall(section(text, "C")) == ["2.50"]
