"""Every command keeps the flags users type: names, aliases and whether each takes a value, as recorded
in ``tests/data/cli_options.json`` (regenerate it with ``python tests/cli_snapshot.py --write`` after
adding an option on purpose)."""

from __future__ import annotations

import json

import pytest
from cli_snapshot import SNAPSHOT, command_options


@pytest.fixture(scope="module")
def current() -> dict:
    return command_options()


def test_every_command_keeps_its_flags(current: dict) -> None:
    recorded = json.loads(SNAPSHOT.read_text())
    assert sorted(current) == sorted(recorded), "commands added or removed"
    for command, options in recorded.items():
        assert current[command] == options, f"{command}: its options changed"
