"""Every command keeps the flags users type: names, aliases and whether each takes a value, as recorded
in ``tests/data/cli_options.json`` (regenerate it with ``python tests/cli_snapshot.py --write`` after
adding an option on purpose); ``-h`` and ``--help`` alike, and one-line errors naming the option."""

from __future__ import annotations

import json
from typing import Any

import pytest
import typer
from cli_snapshot import COMMANDS, SNAPSHOT, click_command, command_options, load_attribute
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def current() -> dict:
    return command_options()


def test_every_command_keeps_its_flags(current: dict) -> None:
    recorded = json.loads(SNAPSHOT.read_text())
    assert sorted(current) == sorted(recorded), "commands added or removed"
    for command, options in recorded.items():
        if command == LAUNCHER:
            continue  # torchrun's own parser: its option list is the installed torch's (2.11 has fewer)
        assert current[command] == options, f"{command}: its options changed"


LAUNCHER = "python -m engine.commands.launch"
# what docs/CLUSTERS.md and the README tell users to pass to the launcher (every torch since the floor has them)
LAUNCHER_FLAGS_USED = ("--nnodes", "--nproc_per_node", "--max-restarts", "--rdzv-backend", "--rdzv-endpoint",
                       "--rdzv-id", "--standalone", "--signals-to-handle")  # fmt: skip


def test_the_launcher_takes_the_flags_the_docs_use(current: dict) -> None:
    flags = {flag for option in current[LAUNCHER] for flag in option.get("flags", [])}
    assert set(LAUNCHER_FLAGS_USED) <= flags, sorted(set(LAUNCHER_FLAGS_USED) - flags)


def typer_commands() -> list[tuple[str, Any, list[str]]]:
    """(command path, its typer app, the arguments that reach it) for every typer command and subcommand."""
    out: list[tuple[str, Any, list[str]]] = []
    for path, source, attribute in COMMANDS:
        target = load_attribute(source, attribute)
        if not isinstance(target, typer.Typer):
            continue  # engine.commands.launch: torchrun's own parser
        out.append((path, target, []))
        for name in getattr(click_command(target), "commands", {}):
            out.append((f"{path} {name}", target, [name]))
    return out


def test_h_is_help_on_every_command_in_one_style() -> None:
    for path, app, args in typer_commands():
        short = CliRunner().invoke(app, [*args, "-h"])
        long = CliRunner().invoke(app, [*args, "--help"])
        assert short.exit_code == 0, f"{path} -h: {short.output}"
        assert short.output == long.output, path
        assert "-h, --help" in short.output, path
        assert "╭" not in short.output, f"{path}: --help in another style (rich panels)"


@pytest.mark.parametrize(
    ("command", "args", "option"),
    [
        ("make-shards", ["celeba", "--root", "r", "--out", "o", "--quality", "0"], "--quality"),
        ("make-shards", ["verify", "r", "--workers", "0"], "--workers"),
        ("mile-eval", ["--model", "m", "--data", "d", "--theta", "1.5"], "--theta"),
        ("mile-eval", ["--model", "m", "--data", "d", "--loader", "fast"], "--loader"),
        ("mile-predict", ["img.jpg", "--model", "m", "--device", "gpu"], "--device"),
        ("tools/bench.py", ["loaders", "--workers", "-1"], "--workers"),
    ],
)
def test_a_bad_value_stops_with_one_line_naming_the_option(command: str, args: list[str], option: str) -> None:
    app = next(target for path, target, _ in typer_commands() if path == command)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"'{option}'" in errors[0], result.output


def options_by_flag(path: str) -> dict[str, Any]:
    app = next(target for command, target, _ in typer_commands() if command == path)
    return {flag: param for param in click_command(app).params for flag in param.opts}


@pytest.mark.parametrize(
    ("command", "flag"),
    [("mile-eval", "--loader"), ("mile-eval", "--workers"), ("mile-eval", "--device"), ("mile-predict", "--device")],
)
def test_an_option_mirroring_a_config_key_says_what_engine_run_says(command: str, flag: str) -> None:
    """The same help text as engine-run's flag for the key (which adds the key's name and built-in value)."""
    mirror, knob = options_by_flag(command)[flag], options_by_flag("engine-run")[flag]
    assert knob.help.startswith(mirror.help)
