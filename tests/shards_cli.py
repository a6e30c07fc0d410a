"""``make-shards`` run in the test's process, as a user runs it (argv in, exit status and output out)."""

from __future__ import annotations

import signal
import sys

import pytest

from shards import cli


def main_status(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """``make-shards ARGS`` through ``shards.cli.main``: its exit status (its SIGTERM handler undone)."""
    monkeypatch.setattr(sys, "argv", ["make-shards", *args])
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return int(exit_info.value.code or 0)


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """``make-shards ARGS``: (exit status, stdout + stderr)."""
    status = main_status(monkeypatch, *args)
    captured = capsys.readouterr()
    return status, captured.out + captured.err
