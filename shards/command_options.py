"""Command-line options, each declared once, and the one style of every command's help and errors.

``Opt`` (flags, type, default, help, bounds) makes the typer option, an ``OptionGroup`` reaches a
command as one value, and ``command_app`` gives every command plain help, ``-h`` and one-line errors.
The lowest layer with a command holds it; engine/ and tools/ reuse it (docs/DESIGN.md, "Command-line
options").
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import typer

HELP_OPTION_NAMES = {"help_option_names": ["-h", "--help"]}

Command = TypeVar("Command", bound=Callable[..., Any])


def command_app(help: str | None = None, *, no_args_is_help: bool = False, completion: bool = False) -> typer.Typer:
    """A typer app in the style every command shares: plain-text help, ``-h`` as ``--help``, errors as
    one line naming the option, no pretty tracebacks. ``completion``: the --install-completion and
    --show-completion options, on the commands that have always had them."""
    return typer.Typer(
        help=help,
        no_args_is_help=no_args_is_help,
        add_completion=completion,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings=HELP_OPTION_NAMES,
    )


@dataclass(frozen=True)
class Opt:
    """One option. ``flags``: its name first, then its aliases ("--x/--no-x" for a switch); ``default``
    ``...`` makes it required; ``min``/``max`` are inclusive bounds; ``check`` returns what is wrong with
    a value (None when nothing is). A bad value stops the command with one line naming the option."""

    flags: tuple[str, ...]
    type: Any
    help: str
    default: Any = ...
    min: float | None = None
    max: float | None = None
    check: Callable[[Any], str | None] | None = None

    def but(self, **changes: Any) -> Opt:
        """This declaration with some fields changed (a command's own default or help)."""
        return dataclasses.replace(self, **changes)

    def option(self, **changes: Any) -> Any:
        """The typer option, as a command parameter's default: ``workers: int = WORKERS.option()``."""
        spec = self.but(**changes) if changes else self
        callback = _checked(spec.check) if spec.check is not None else None
        return typer.Option(spec.default, *spec.flags, help=spec.help, min=spec.min, max=spec.max, callback=callback)

    def parameter(self, name: str) -> inspect.Parameter:
        """A keyword parameter ``name`` taking this option, for a signature built from declarations."""
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=self.option(), annotation=self.type)


def _checked(check: Callable[[Any], str | None]) -> Callable[[Any], Any]:
    def callback(value: Any) -> Any:
        for item in value if isinstance(value, (list, tuple)) else (value,):
            problem = None if item is None else check(item)
            if problem is not None:
                raise typer.BadParameter(problem)
        return value

    return callback


@dataclass(frozen=True)
class OptionGroup:
    """Options that always travel together and reach a command as one value: ``build(**values)``,
    called with one keyword per option (e.g. the shard writer's settings)."""

    options: dict[str, Opt]  # parameter name -> declaration, in the order --help lists them
    build: Callable[..., Any]

    def but(self, **changes: Opt) -> OptionGroup:
        """The group with some options declared differently (a command's own default or help)."""
        return OptionGroup({**self.options, **changes}, self.build)


def with_options(**groups: OptionGroup) -> Callable[[Command], Command]:
    """Give the command, in place of each parameter named in ``groups``, that group's options; the
    command still receives the parameter, built from them."""

    def decorate(command: Command) -> Command:
        params: list[inspect.Parameter] = []
        for param in inspect.signature(command).parameters.values():
            if param.name in groups:
                params += [opt.parameter(name) for name, opt in groups[param.name].options.items()]
            else:
                params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            for target, group in groups.items():
                values[target] = group.build(**{name: values.pop(name) for name in group.options})
            return command(**values)

        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        # typer resolves the annotations it finds; a group's value type may be imported only when type checking
        run.__annotations__ = {k: v for k, v in command.__annotations__.items() if k not in groups}
        return run  # type: ignore[return-value]

    return decorate
