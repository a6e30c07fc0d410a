"""Every command's option list (names, aliases, whether each takes a value), read from the registered
parameters, and the snapshot of it that ``test_cli_options.py`` compares against.

Regenerate the snapshot after adding or renaming an option on purpose::

    PYTHONPATH=$PWD python tests/cli_snapshot.py --write

A command moved to another module is retargeted in ``COMMANDS`` alone.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SNAPSHOT = Path(__file__).resolve().parent / "data" / "cli_options.json"

# (command as a user types it, module or repo-relative script, attribute): a typer app, a function
# that ``typer.run`` runs, or (engine.commands.launch) a function returning an argparse parser.
COMMANDS: list[tuple[str, str, str]] = [
    ("engine-run", "engine.commands.run", "app"),
    ("make-shards", "shards.cli", "app"),
    ("mile-export", "engine.commands.export", "app"),
    ("mile-predict", "engine.commands.predict", "app"),
    ("mile-eval", "engine.commands.evaluate", "app"),
    ("python -m engine.commands.demo", "engine.commands.demo", "app"),
    ("tools/bench.py", "tools/bench.py", "app"),
    ("tools/report.py", "tools/report.py", "app"),
    ("tools/sweep.py", "tools/sweep.py", "app"),
    (
        "python -m engine.commands.launch",
        "torch.distributed.run",
        "get_args_parser",
    ),  # torchrun's own options, unchanged
]


def load_attribute(source: str, attribute: str) -> Any:
    """``attribute`` of a module (dotted name) or of a script (a path ending in .py, run as a module)."""
    if source.endswith(".py"):
        name = "_cli_snapshot_" + source.replace("/", "_").removesuffix(".py")
        spec = importlib.util.spec_from_file_location(name, REPO / source)
        assert spec is not None and spec.loader is not None, source
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(source)
    return getattr(module, attribute)


def click_command(target: Any) -> Any:
    """The click command (typer vendors its own click) behind a typer app or a function that ``typer.run`` would run."""
    import typer

    if isinstance(target, typer.Typer):
        return typer.main.get_command(target)
    app = typer.Typer()
    app.command()(target)
    return typer.main.get_command(app)


def describe_parameter(param: Any) -> dict[str, Any]:
    if param.param_type_name == "argument":
        return {"argument": param.name, "multiple": param.nargs != 1}
    return {
        "flags": sorted(param.opts),
        "negations": sorted(param.secondary_opts),
        "takes_value": not param.is_flag,
        "multiple": bool(param.multiple),
    }


def click_options(command: Any, path: str) -> dict[str, list[dict[str, Any]]]:
    """``{command path: its parameters}`` for the command and, for a group, each subcommand."""
    out = {path: [describe_parameter(p) for p in command.params]}  # the help option is not in .params
    for name, sub in sorted(getattr(command, "commands", {}).items()):  # a group's subcommands
        out.update(click_options(sub, f"{path} {name}"))
    return out


def argparse_options(parser: argparse.ArgumentParser, path: str) -> dict[str, list[dict[str, Any]]]:
    params: list[dict[str, Any]] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:
            params.append({"argument": action.dest, "multiple": action.nargs not in (None, 1)})
            continue
        takes_value = action.nargs != 0
        params.append(
            {"flags": sorted(action.option_strings), "negations": [], "takes_value": takes_value, "multiple": False}
        )
    return {path: params}


def command_options() -> dict[str, list[dict[str, Any]]]:
    """The option list of every command and subcommand, keyed by how a user types it."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path, source, attribute in COMMANDS:
        target = load_attribute(source, attribute)
        if source == "torch.distributed.run":
            out.update(argparse_options(target(), path))
        else:
            out.update(click_options(click_command(target), path))
    return out


def main(argv: list[str]) -> int:
    current = command_options()
    if argv == ["--write"]:
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(json.dumps(current, indent=1) + "\n")
        print(f"wrote {SNAPSHOT.relative_to(REPO)} ({len(current)} commands)")
        return 0
    print(json.dumps(current, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main(sys.argv[1:]))
