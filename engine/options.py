"""The command-line options that the engine's commands and the tools share, declared once. An option
that mirrors a config knob (``--loader`` is ``data.backend``) takes its flag, type, default, help and
bounds from the knob in ``engine/config.py``; a command changes only what differs (its default, or
help saying what the value is for there)."""

from __future__ import annotations

import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.config import device_problem, key_by_name
from shards.command_options import Opt

_OPEN_BOUNDS = {"gt": (lambda value, bound: value > bound, ">"), "lt": (lambda value, bound: value < bound, "<")}


def knob_option(name: str, **changes: Any) -> Opt:
    """The option mirroring config key ``name`` (e.g. "data.backend"): the knob's short flag, type,
    default, help and bounds, with ``changes`` applied."""
    key = key_by_name()[name]
    kind = key.type
    if typing.get_origin(kind) is tuple:  # a repeatable flag
        kind = list[typing.get_args(kind)[0]]  # type: ignore[misc]
    declared = Opt(
        flags=(key.alias or key.flag,),
        type=kind,
        help=key.help,
        default=key.field.default,
        min=key.bounds.get("ge"),
        max=key.bounds.get("le"),
        check=_open_bounds(key.bounds),
    )
    return declared.but(**changes)


def _open_bounds(bounds: dict[str, float]) -> Callable[[Any], str | None] | None:
    """The check of a knob's exclusive bounds (typer's min and max are inclusive)."""
    open_bounds = {name: bound for name, bound in bounds.items() if name in _OPEN_BOUNDS}
    if not open_bounds:
        return None
    allowed = " and ".join(f"{_OPEN_BOUNDS[name][1]} {bound:g}" for name, bound in open_bounds.items())

    def check(value: Any) -> str | None:
        inside = all(_OPEN_BOUNDS[name][0](value, bound) for name, bound in open_bounds.items())
        return None if inside else f"must be {allowed}, got {value}"

    return check


DEVICE = knob_option("device", check=device_problem)
LOADER = knob_option("data.backend")
WORKERS = knob_option("data.num_workers")
BATCH_SIZE = knob_option("global_batch_size", help="Images per batch.")
THETA = knob_option("eval_thetas")
IMAGE_SIZE = knob_option("data.image_size_px")
ARCH = knob_option("arch")
NUM_STEPS = knob_option("num_steps")
MODEL = Opt(("--model",), Path, "An exported model folder (mile-export).")
OUT = Opt(("--out",), Path, "Where the results go.")  # each command says what it writes there
CONFIG = Opt(("--config",), Path | None, "A TOML run config (engine/configs/, or a run's config.toml).", None)
