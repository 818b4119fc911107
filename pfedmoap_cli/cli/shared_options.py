"""``--workspace``, ``--data-root`` and ``--quiet`` after the subcommand as well as before it.

People write ``pfedmoap partition --dataset X --data-root /data`` as often as
``pfedmoap --data-root /data partition --dataset X``. The top-level callback
reads the options before the subcommand (with their environment variables and
defaults); :func:`with_shared_options` adds the same three options to a
subcommand, and a value given there overrides the one from before it. One
implementation: the subcommand modules are untouched and keep reading
``ctx.obj``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from pfedmoap_cli.cli.context import CliContext

WORKSPACE_HELP = "Workspace folder for partitions, runs, caches and reports."
DATA_ROOT_HELP = "Folder holding the datasets."
QUIET_HELP = "No progress bars."

def _after(text: str) -> str:
    return text.rstrip(".") + "; also accepted before the command name."


# Parameter names that no subcommand uses, so they cannot clash with its own.
_SHARED = {
    "shared_workspace": inspect.Parameter(
        "shared_workspace",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[Optional[Path], typer.Option("--workspace", "-w", metavar="DIR", help=_after(WORKSPACE_HELP))],
    ),
    "shared_data_root": inspect.Parameter(
        "shared_data_root",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[Optional[Path], typer.Option("--data-root", metavar="DIR", help=_after(DATA_ROOT_HELP))],
    ),
    "shared_quiet": inspect.Parameter(
        "shared_quiet",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[Optional[bool], typer.Option("--quiet", "-q", help=_after(QUIET_HELP))],
    ),
}


def apply_shared_options(context: CliContext, workspace: Path | None, data_root: Path | None, quiet: bool | None) -> CliContext:
    """``context`` with the options given after the subcommand taking precedence."""
    changes: dict[str, Any] = {}
    if workspace is not None:
        changes["workspace"] = workspace
    if data_root is not None:
        changes["data_root"] = data_root
    if quiet:
        changes["progress"] = False
    return dataclasses.replace(context, **changes) if changes else context


def with_shared_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` with ``--workspace``, ``--data-root`` and ``--quiet`` added to its options.

    The command's first parameter must be the ``typer.Context``.
    """
    signature = inspect.signature(command, eval_str=True)
    hints = typing.get_type_hints(command, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()]
    clash = set(_SHARED) & {p.name for p in own}
    if clash:
        raise TypeError(f"{command.__name__} already has parameters {sorted(clash)}")

    @functools.wraps(command)
    def wrapper(*args: Any, shared_workspace=None, shared_data_root=None, shared_quiet=None, **kwargs: Any) -> Any:
        ctx = kwargs["ctx"] if "ctx" in kwargs else args[0]
        ctx.obj = apply_shared_options(ctx.obj, shared_workspace, shared_data_root, shared_quiet)
        return command(*args, **kwargs)

    parameters = [*own, *_SHARED.values()]
    del wrapper.__wrapped__  # typer must read the new signature, not the command's
    wrapper.__signature__ = signature.replace(parameters=parameters)
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper
