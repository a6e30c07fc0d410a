"""The command-line options that the engine's commands and the tools share, declared once.

An option that mirrors a config knob (``--loader`` is ``data.backend``) takes its flag, type,
default, help and bounds from the knob in ``engine/config.py``; a command changes only what differs
(its default, or help saying what the value is for there).
"""

from __future__ import annotations

import functools
import typing
from pathlib import Path
from typing import Any

from engine.config import bounds_problem, device_problem, key_by_name
from shards.command_options import Opt


def knob_option(name: str, **changes: Any) -> Opt:
    """The option mirroring config key ``name`` (e.g. "data.backend"): the knob's short flag, type,
    default, help and bounds, with ``changes`` applied."""
    key = key_by_name()[name]
    kind = key.type
    if typing.get_origin(kind) is tuple:  # a repeatable flag
        kind = list[typing.get_args(kind)[0]]  # type: ignore[misc]
    # typer's min and max are inclusive bounds; exclusive ones (theta's > 0 and < 1) become a check
    exclusive = {name: bound for name, bound in key.bounds.items() if name in ("gt", "lt")}
    declared = Opt(
        flags=(key.alias or key.flag,),
        type=kind,
        help=key.help,
        default=key.field.default,
        min=key.bounds.get("ge"),
        max=key.bounds.get("le"),
        check=functools.partial(bounds_problem, exclusive) if exclusive else None,
    )
    return declared.but(**changes)


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
