"""The ``pfedmoap`` command: typer wiring and the one place errors become exit codes."""

from __future__ import annotations

import errno
import functools
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional


def _interrupted_while_starting(signum, frame) -> None:  # noqa: ARG001 -- signal handler signature
    """Ctrl-C while the CLI is still importing (torch takes seconds): one line, exit 130, no traceback.

    Nothing has been read or written yet. ``SystemExit`` rather than
    ``KeyboardInterrupt``: the import runs in the console script's top level,
    where no handler of ours could catch the latter before Python prints its
    traceback.
    """
    sys.stderr.write("interrupted while starting; nothing was done\n")
    sys.stderr.flush()
    raise SystemExit(130)


# Installed before the heavy imports below (torch, through the commands) and restored
# right after them, also when one fails. Only the main thread may set signal handlers;
# an import from another thread leaves them alone.
try:
    _handler_before_imports = signal.signal(signal.SIGINT, _interrupted_while_starting)
except ValueError:
    _handler_before_imports = None
try:
    import typer

    from pfedmoap_cli import __version__
    from pfedmoap_cli.artifacts.atomic import os_error_of, storage_error
    from pfedmoap_cli.cli import download_cmd, evaluate_cmd, partition_cmd, report_cmd, sweep_cmd, train_cmd
    from pfedmoap_cli.cli.context import CliContext
    from pfedmoap_cli.cli.shared_options import DATA_ROOT_HELP, QUIET_HELP, WORKSPACE_HELP, with_shared_options
    from pfedmoap_cli.errors import StorageError, UserError
finally:
    # From here on Ctrl-C raises KeyboardInterrupt again, which main() reports.
    if _handler_before_imports is not None:
        signal.signal(signal.SIGINT, _handler_before_imports)

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
        typer.Option("--workspace", "-w", metavar="DIR", envvar="PFEDMOAP_WORKSPACE", help=WORKSPACE_HELP),
    ] = Path("pfedmoap-workspace"),
    data_root: Annotated[
        Path, typer.Option("--data-root", metavar="DIR", envvar="PFEDMOAP_DATA", help=DATA_ROOT_HELP)
    ] = Path("data"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = None,
) -> None:
    """Options shared by every subcommand."""
    ctx.obj = CliContext(workspace=workspace, data_root=data_root, progress=not quiet)


class _Interrupted(Exception):
    """Ctrl-C inside a command, carried past typer to :func:`main` with the command's one-line message.

    typer turns a ``KeyboardInterrupt`` raised in a command into ``Exit(130)``,
    which click (outside standalone mode) hands back as a bare return code: the
    message in :func:`main` never ran. A plain ``Exception`` passes through both.
    """


def _continue_advice(command: str, ctx: Any, path: object) -> str:
    """How to carry on after ``command`` stopped on a storage error at ``path``.

    ``train`` continues with ``--resume`` once its run exists (run.json written;
    before that, ``--resume`` would find no run); everything else is repeated.
    """
    if command != "train" or "--resume" in sys.argv[1:] or path is None:
        return StorageError.RERUN
    try:
        runs = Path(os.path.abspath(ctx.obj.workspace)) / "runs"
        run_dir = runs / Path(os.path.abspath(str(path))).relative_to(runs).parts[0]
    except (AttributeError, ValueError, IndexError):
        return StorageError.RERUN
    return "run the same command with --resume" if (run_dir / "run.json").is_file() else StorageError.RERUN


def _interrupt_message(command: str) -> str:
    if command == "train":
        again = shlex.join(["pfedmoap", *sys.argv[1:], *([] if "--resume" in sys.argv[1:] else ["--resume"])])
        return f"interrupted; completed rounds are saved, continue with '{again}'"
    return "interrupted; files already written are complete, run the same command again to finish"


_command_started = False


def _guarded(name: str, command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` with Ctrl-C turned into :class:`_Interrupted` and storage advice fitted to it."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _command_started
        _command_started = True
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt as interrupt:
            raise _Interrupted(_interrupt_message(name)) from interrupt
        except StorageError as error:
            ctx = kwargs["ctx"] if "ctx" in kwargs else (args[0] if args else None)
            raise error.with_rerun(_continue_advice(name, ctx, error.path)) from error.__cause__

    # typer reads the signature with_shared_options made (``__signature__``, copied by wraps)
    del wrapper.__wrapped__
    return wrapper


def _command(name: str, command: Callable[..., Any], help: str) -> None:
    # Every subcommand also takes --workspace, --data-root and --quiet after its name.
    app.command(name, help=help)(_guarded(name, with_shared_options(command)))


_command("download", download_cmd.download, download_cmd.HELP)
_command("partition", partition_cmd.partition, partition_cmd.HELP)
_command("train", train_cmd.train, train_cmd.HELP)
_command("evaluate", evaluate_cmd.evaluate, evaluate_cmd.HELP)
_command("report", report_cmd.report, report_cmd.HELP)
_command("sweep", sweep_cmd.sweep, sweep_cmd.HELP)


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

    A :class:`UserError` prints ``error: <message>`` and exits 2, and so does an
    ``OSError`` (or safetensors error carrying one) that escaped the write
    boundary in :mod:`pfedmoap_cli.artifacts.atomic`: a full disk or a read-only
    workspace is not a bug. Ctrl-C prints one ``interrupted; ...`` line and
    exits 130. Any other exception is reported as an internal error (exit 1).
    ``PFEDMOAP_DEBUG=1`` shows the traceback instead.
    """
    global _command_started
    debug = os.environ.get("PFEDMOAP_DEBUG", "") not in {"", "0"}
    _command_started = False
    try:
        # Without standalone mode click hands back exit codes instead of exiting.
        code = app(standalone_mode=False)
        if code == 130 and not _command_started:
            # Ctrl-C while click parsed the command line (typer made it Exit(130));
            # a command that exits 130 itself (sweep) has printed its own message.
            typer.echo("interrupted; nothing was done", err=True)
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except UserError as error:
        if debug:
            raise
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except _Interrupted as interrupt:
        if debug:
            raise
        typer.echo(str(interrupt), err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing was done", err=True)
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
        cause = os_error_of(error)
        if cause is not None and cause.errno is not None and cause.errno != errno.EPIPE:
            # The environment, not a bug: an OS error outside atomic_write (a read, a folder made elsewhere).
            typer.echo(f"error: {storage_error(cause, action='at')}", err=True)
            sys.exit(StorageError.exit_code)
        typer.echo(f"internal error: {type(error).__name__}: {error} (rerun with PFEDMOAP_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)

