"""``engine-run``: train softmax, sigmoid or MILe; with no arguments, MILe on the embedded digit grid.

Every config key is a flag, generated from the schema in ``engine/config.py``: ``--section.key``
(the TOML key) and, for most, a short alias (``--lr`` for ``--optim.lr_per_256``). Values are
resolved and checked before anything is built or written.
"""

from __future__ import annotations

import enum
import errno
import inspect
import logging
import os
import sys
import threading
import traceback
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from engine.config import (
    DEFAULT_CONFIG,
    PHOTO_IMAGE_SIZE_PX,
    ConfigError,
    Key,
    Layer,
    RunConfig,
    build_layered,
    changed_keys,
    check_loader_workers,
    config_keys,
    default_config_path,
    flatten,
    key_by_name,
    load_toml,
    non_default_values,
    to_toml,
)
from engine.options import CONFIG
from shards.command_options import Opt, command_app

log = logging.getLogger(__name__)
_PANELS = {"data": "Data", "method": "Method", "optim": "Optimizer", "checkpoint": "Checkpoints"}


# -- flags from the schema --------------------------------------------------------------------


def param_name(key: Key) -> str:
    return key.name.replace(".", "__")


def _flag_decls(key: Key) -> list[str]:
    flags = [key.flag] + ([key.alias] if key.alias and key.alias != key.flag else [])
    if key.type is bool:  # --data.augment/--no-data.augment, --augment/--no-augment
        return [f"{flag}/--no-{flag[2:]}" for flag in flags]
    return flags


def _cli_type(key: Key) -> Any:
    if typing.get_origin(key.type) is tuple:
        return types.GenericAlias(list, (typing.get_args(key.type)[0],))  # list[item type]
    return key.type


def help_value(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    elif isinstance(value, (tuple, list)):
        return ", ".join(str(v) for v in value)
    return repr(value)


def _help(key: Key, grid: dict[str, Any]) -> str:
    """The key's help, its default on your own data and, where it differs, the digit grid's value."""
    default = help_value(key.field.default)
    on_grid = (
        f"; digit grid: {help_value(grid[key.name])}"
        if key.name in grid and help_value(grid[key.name]) != default
        else ""
    )
    return f"{key.help} [key: {key.name}; default: {default}{on_grid}]"


def config_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per config key, each a typer option."""
    params = []
    grid = flatten(load_toml(default_config_path()), GRID_SOURCE)
    for key in config_keys():
        section = key.name.split(".")[0] if "." in key.name else ""
        option = typer.Option(
            None,
            *_flag_decls(key),
            help=_help(key, grid),
            rich_help_panel=_PANELS.get(section, "Run"),
            show_default=False,
        )
        params.append(
            inspect.Parameter(
                param_name(key), inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[_cli_type(key)]
            )
        )
    return params


def overrides_from(options: dict[str, Any]) -> dict[str, Any]:
    """Config key -> value for every flag given (None or an empty list = not given)."""
    out = {}
    for key in config_keys():
        value = options.get(param_name(key))
        if value is not None and value != []:
            out[key.name] = value
    return out


# -- resolving the config -------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedRun:
    """A run's config, whether it resumes, and where each key's value came from (a key no layer set
    has the schema's default)."""

    config: RunConfig
    resuming: bool
    sources: dict[str, str]


def resolve_config(
    config_file: Optional[Path], resume: bool, overrides: dict[str, Any], resume_auto: bool = False
) -> tuple[RunConfig, bool]:
    """The run's config and whether it resumes (``resolve_run``)."""
    resolved = resolve_run(config_file, resume, overrides, resume_auto)
    return resolved.config, resolved.resuming


def resolve_run(
    config_file: Optional[Path], resume: bool, overrides: dict[str, Any], resume_auto: bool = False
) -> ResolvedRun:
    """The run's config, whether it resumes, and each value's source (docs/DESIGN.md, "Configuration").

    ``--resume``: the run's saved config (complete), with only safe changes. Otherwise layers, a later
    one winning: the base the data chooses (the digit grid's config for the grid, the schema's general
    defaults and the data's own image size for any other data), then ``--config FILE``, then the
    flags. With ``--resume-auto`` (and in a worker group that torchrun restarted) that config resumes
    the run in ``--out`` when the folder holds a checkpoint, after the same check of what changed,
    and starts afresh when it holds none."""
    if resume:
        if config_file is not None:
            raise ConfigError(
                "--resume continues a run with its own config.toml; drop --config (flags may change safe keys)"
            )
        from engine.run_folder import saved_config

        out_dir = overrides.get("out_dir") or RunConfig.out_dir  # the field's default
        saved = saved_config(out_dir)
        saved_layer = Layer(f"{out_dir}/config.toml", flatten(saved.to_json(), f"{out_dir}/config.toml"))
        config, sources = build_layered([saved_layer, Layer(FLAGS, overrides)])
        check_resume_changes(saved, config)
        return ResolvedRun(config, True, sources)
    file_values = flatten(load_toml(config_file), str(config_file)) if config_file is not None else {}
    given = {**file_values, **overrides}
    base = base_layers(str(given.get("data.root") or ""), str(given.get("data.train_split") or "train"))
    file_layer = Layer(f"--config {config_file}", file_values)
    config, sources = build_layered([*base, file_layer, Layer(FLAGS, overrides)])
    resuming = (resume_auto or restarted_by_torchrun()) and _has_checkpoint(config)
    return ResolvedRun(config, resuming, sources)


def _has_checkpoint(config: RunConfig) -> bool:
    """The run folder holds a checkpoint, which ``config`` may continue (else a ConfigError)."""
    from engine.run_folder import RunFolder, saved_config

    if not RunFolder(config.out_dir).checkpoint_path.is_file():
        return False
    check_resume_changes(saved_config(config.out_dir), config)
    return True


FLAGS = "flags"  # the source of the command line's values
GRID_SOURCE = f"digit grid (engine/configs/{DEFAULT_CONFIG})"


def base_layers(root: str, train_split: str) -> list[Layer]:
    """The base the data chooses: the digit grid's config when ``root`` is empty (the embedded grid)
    or a folder of the grid; else the schema's general defaults, with the data's own image size
    when it is under ``PHOTO_IMAGE_SIZE_PX``. A folder that cannot be read adds nothing (the run's
    plan reports it)."""
    if not root or is_digit_grid(Path(root), train_split):
        return [Layer(GRID_SOURCE, flatten(load_toml(default_config_path()), GRID_SOURCE))]
    size_px = data_image_size_px(Path(root), train_split)
    if size_px is None or size_px >= PHOTO_IMAGE_SIZE_PX:
        return []
    return [Layer(f"data ({root}: images of {size_px} px)", {"data.image_size_px": max(size_px, 8)})]


def is_digit_grid(root: Path, split: str) -> bool:
    """``root`` holds the digit grid (its manifest says so)."""
    from shards.manifest import ShardError, load_split

    try:
        return load_split(root, split).extra.get("source") == "digits-grid"
    except (ShardError, OSError, ValueError):
        return False


def data_image_size_px(root: Path, split: str, images: int = 16) -> Optional[int]:
    """The data's own size: the largest shorter side among the first ``images`` images of the split's
    first shard; None when it cannot be read."""
    import tarfile

    from PIL import Image

    from shards.format import FIELD_IMAGE
    from shards.manifest import ShardError, load_split

    try:
        shards = load_split(root, split).shards
        if not shards:
            return None
        sides = []
        with tarfile.open(root / shards[0].path) as tar:
            for member in tar:
                if member.name.endswith(f".{FIELD_IMAGE}") and (file := tar.extractfile(member)) is not None:
                    with Image.open(file) as image:
                        sides.append(min(image.size))
                    if len(sides) == images:
                        break
        return max(sides) if sides else None
    except (ShardError, OSError, ValueError, tarfile.TarError):
        return None


def log_sources(config: RunConfig, sources: dict[str, str]) -> None:
    """The log's first lines: each value that is not the schema's default and where it came from."""
    changed = non_default_values(config, sources)
    if not changed:
        log.info("config: the general defaults (engine-run --help), nothing changed")
        return
    width = max(len(name) for name, _, _ in changed)
    log.info("config: values other than the general defaults (engine-run --help), and their source:")
    keys = key_by_name()
    for name, value, source in changed:
        if source == FLAGS:  # name the flag as given: its alias when it has one
            source = f"flag {keys[name].alias or keys[name].flag}"
        log.info("  %s = %r  (%s)", name.ljust(width), value, source)


def restarted_by_torchrun() -> bool:
    """A worker group that ``torchrun --max-restarts N`` started again after a failure: it continues
    from the last checkpoint without being told to."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def check_resume_changes(saved: RunConfig, config: RunConfig) -> None:
    """Refuse changes that would make the resumed run a different experiment."""
    unsafe = [(key, old, new) for key, old, new in changed_keys(saved, config) if not key.resume_safe]
    if unsafe:
        listed = "; ".join(f"{key.label()}: {old!r} -> {new!r}" for key, old, new in unsafe)
        safe = ", ".join(key.name for key in config_keys() if key.resume_safe)
        raise ConfigError(f"--resume cannot change what the run is: {listed}. Keys that may change on resume: {safe}")


# -- the command ----------------------------------------------------------------------------

app = command_app()


def run(
    config: Optional[Path] = None,
    print_config: bool = False,
    resume: bool = False,
    resume_auto: bool = False,
    gpus: int = 1,
    **options: Any,
) -> None:
    """Train softmax, sigmoid or MILe (Multi-label Iterated Learning) from WebDataset shards.

    Every key of a TOML config is also a flag: --section.key (e.g. --optim.lr_per_256) or its alias (--lr).
    Values come from, a later one winning: the defaults shown here (on the embedded digit grid, without
    --data, its own values: "digit grid"), --config FILE, then the flags. --print-config shows what a
    run would use; the log's first lines say where each value that is not a default came from.
    """
    if resume and resume_auto:
        raise ConfigError("give --resume or --resume-auto, not both")
    resolved = resolve_run(config, resume, overrides_from(options), resume_auto)
    run_config, resuming = resolved.config, resolved.resuming
    if print_config:
        typer.echo(to_toml(run_config), nl=False)
        return
    check_loader_workers(run_config.data.num_workers, "data.num_workers (--workers)")
    from engine.commands.runner import check_out_folder

    check_out_folder(Path(run_config.out_dir), "out_dir (--out)")
    if int(os.environ.get("RANK", "0") or 0) == 0 and not (gpus > 1 and "WORLD_SIZE" not in os.environ):
        log_sources(run_config, resolved.sources)
    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch(gpus)
        return
    _train(run_config, resuming)


# The flags that are not config keys, in the order --help lists them.
_FIXED = {
    "config": CONFIG.but(help="TOML config (e.g. a run's config.toml) over the defaults; flags override it."),
    "print_config": Opt(
        ("--print-config",), bool, "Print the resolved config as TOML and exit (nothing is built or written).", False
    ),
    "resume": Opt(
        ("--resume",), bool, "Continue the run in --out from its last checkpoint, with its saved config.", False
    ),
    "resume_auto": Opt(
        ("--resume-auto",),
        bool,
        "Resume the run in --out when it holds a checkpoint of this same config (changes as --resume allows them), "
        "else start it: one command for a job that may be re-queued. A worker group restarted by torchrun "
        "--max-restarts does this by itself.",
        False,
    ),
    "gpus": Opt(
        ("--gpus",), int, "GPUs on this node; N > 1 re-launches under torchrun (engine.commands.launch).", 1, min=1
    ),
}
fixed = [opt.parameter(name) for name, opt in _FIXED.items()]
run.__signature__ = inspect.Signature(fixed + config_parameters())  # type: ignore[attr-defined]
app.command()(run)


def _relaunch(gpus: int) -> None:
    """Become the launcher (exec, not a child): a signal sent to this command (a terminal's, SLURM's)
    then reaches the launcher, which forwards it to the workers, and its exit status is this command's."""
    from engine.distributed import torchrun_command

    command = torchrun_command(gpus, without_gpus_flag(sys.argv[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


def without_gpus_flag(argv: list[str]) -> list[str]:
    """The arguments minus ``--gpus N`` / ``--gpus=N`` (the children must not re-launch)."""
    out, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg == "--gpus":
            skip_next = True
        elif not arg.startswith("--gpus="):
            out.append(arg)
    return out


def _train(run_config: RunConfig, resume: bool) -> None:
    from engine.commands.report import print_metrics_table
    from engine.distributed import init_distributed, shutdown_distributed
    from engine.run_folder import RunFolder
    from engine.trainer import Trainer

    # One process trains in a folder at a time: rank 0 holds its lock for the whole run (the other
    # ranks write nothing), taken before it joins the group so that a refusal costs no collective.
    is_main = int(os.environ.get("RANK", "0") or 0) == 0
    with RunFolder(run_config.out_dir, is_main=is_main).lock():
        dist = init_distributed(run_config.device, run_config.cuda_graphs)
        completed = False
        try:
            summary = Trainer(run_config, dist, resume).run()
            completed = True
            if dist.is_main:
                title = f"{run_config.method.name} on {run_config.data.root or 'digit grid'}"
                print_metrics_table(summary, title=title)
        finally:
            shutdown_distributed(completed)


def _os_error_advice(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "Free space or choose another --out, then continue with --resume."
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "The folder is not writable: choose another --out, or make it writable and continue with --resume."
    return "Choose another --out, or fix the path and continue with --resume."


def _thread_os_errors_as_lines() -> None:
    """A writer thread that fails on a full disk or a read-only folder (TensorBoard's) logs one line;
    the main thread reports the same cause as the run's error. Other thread errors keep their traceback."""
    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError):
            name = args.thread.name if args.thread is not None else "a thread"
            logging.getLogger(__name__).warning("%s stopped: %s", name, args.exc_value)
        else:
            default(args)

    threading.excepthook = hook


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _thread_os_errors_as_lines()
    code = run_command()
    from engine.distributed import exit_worker, joined_process_group

    if joined_process_group():
        exit_worker(code)  # a worker of a multi-process run: see exit_worker for why not SystemExit
    raise SystemExit(code)


def run_command() -> int:
    """Run ``engine-run`` on ``sys.argv``; its exit status (errors are printed as one line)."""
    from engine.checkpoint import CheckpointError
    from engine.distributed import joined_process_group
    from engine.run_folder import RunFolderError
    from engine.trainer import NonFiniteLoss, RunInterrupted
    from shards.manifest import ShardError

    try:
        app()
    except SystemExit as finished:  # typer ends every command this way, 0 included
        return finished.code if isinstance(finished.code, int) else (0 if finished.code is None else 1)
    except RunInterrupted as stopped:
        typer.secho(str(stopped), fg=typer.colors.YELLOW, err=True)
        return stopped.exit_code
    except NonFiniteLoss as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        return 3
    except (ConfigError, ShardError, RunFolderError, CheckpointError, FileNotFoundError, ValueError) as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        return 2
    except (
        OSError
    ) as error:  # a full disk, a read-only --out: the message names the path; the last checkpoint is intact
        typer.secho(f"error: {error}. {_os_error_advice(error)}", fg=typer.colors.RED, err=True)
        return 2
    except Exception:  # a peer that died, a bug: the traceback, then the same careful exit
        if not joined_process_group():
            raise
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    main()
