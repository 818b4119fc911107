"""The ``pfedmoap`` command: typer wiring and the one place errors become exit codes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pfedmoap_cli import __version__
from pfedmoap_cli.cli import download_cmd, evaluate_cmd, partition_cmd, report_cmd, sweep_cmd, train_cmd
from pfedmoap_cli.cli.context import CliContext
from pfedmoap_cli.cli.shared_options import DATA_ROOT_HELP, QUIET_HELP, WORKSPACE_HELP, with_shared_options
from pfedmoap_cli.errors import UserError

app = typer.Typer(
    name="pfedmoap",
    help=(
        "Personalized federated prompt learning for CLIP: pFedMoAP and its baselines.\n\n"
        "Stages talk through files in a workspace:\n\n"
        "  pfedmoap partition --dataset synthetic --pathological --clients 6\n\n"
        "  pfedmoap train --method promptfl --rounds 2\n\n"
        "  pfedmoap evaluate --run RUN_ID\n\n"
        "  pfedmoap report"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Help texts are plain text: "[train]" is a TOML table name, not rich markup
    # (in markup mode rich swallowed it as an unknown style tag).
    rich_markup_mode=None,
)


def _plain_help_extras() -> None:
    """Print "[default: 1]" and "[required]" in help as they are.

    typer before 0.21 (the versions Flower 1.42 admits) escapes those brackets
    for rich ("\\[default: 1]") even when help is plain text, so the backslash
    reached the terminal. Escaping is only right for rich markup, which this
    CLI does not use.
    """
    try:
        from typer import rich_utils
    except ImportError:  # typer without rich: nothing is escaped
        return
    rich_utils.escape_before_html_export = lambda text: text.strip()


_plain_help_extras()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pfedmoap {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    workspace: Annotated[
        Path,
        typer.Option("--workspace", "-w", envvar="PFEDMOAP_WORKSPACE", help=WORKSPACE_HELP),
    ] = Path("pfedmoap-workspace"),
    data_root: Annotated[
        Path, typer.Option("--data-root", envvar="PFEDMOAP_DATA", help=DATA_ROOT_HELP)
    ] = Path("data"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = None,
) -> None:
    """Options shared by every subcommand."""
    ctx.obj = CliContext(workspace=workspace, data_root=data_root, progress=not quiet)


# Every subcommand also takes --workspace, --data-root and --quiet after its name.
app.command("download", help=download_cmd.HELP)(with_shared_options(download_cmd.download))
app.command("partition", help=partition_cmd.HELP)(with_shared_options(partition_cmd.partition))
app.command("train", help=train_cmd.HELP)(with_shared_options(train_cmd.train))
app.command("evaluate", help=evaluate_cmd.HELP)(with_shared_options(evaluate_cmd.evaluate))
app.command("report", help=report_cmd.HELP)(with_shared_options(report_cmd.report))
app.command("sweep", help=sweep_cmd.HELP)(with_shared_options(sweep_cmd.sweep))


def _is_click_exception(error: BaseException) -> bool:
    """Whether ``error`` is a click usage/parameter error, from click itself or typer's own copy.

    Recent typer versions ship a private copy of click whose exceptions are not
    instances of the ``click`` package's classes (older ones use ``click``), so
    the test is on the class name in the hierarchy, which both share.
    """
    names = {cls.__name__ for cls in type(error).__mro__}
    return "ClickException" in names and callable(getattr(error, "show", None)) and isinstance(getattr(error, "exit_code", None), int)


def main() -> None:
    """Console entry point: run the app, turning errors into one-line messages.

    A :class:`UserError` prints ``error: <message>`` and exits 2; any other
    exception is reported as an internal error (exit 1). ``PFEDMOAP_DEBUG=1``
    shows the traceback instead.
    """
    debug = os.environ.get("PFEDMOAP_DEBUG", "") not in {"", "0"}
    try:
        # Without standalone mode click hands back exit codes instead of exiting.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except UserError as error:
        if debug:
            raise
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted; completed rounds are saved, continue with 'pfedmoap train --resume'", err=True)
        sys.exit(130)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Exception as error:  # noqa: BLE001 -- the single place that maps unexpected errors
        if _is_click_exception(error):
            error.show()  # click's usage line and message; usage errors exit 2
            sys.exit(error.exit_code)
        if debug:
            raise
        typer.echo(f"internal error: {type(error).__name__}: {error} (rerun with PFEDMOAP_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)
