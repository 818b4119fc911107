"""Usage errors through the INSTALLED ``pfedmoap`` script: click's usage line, exit 2, never "internal error".

Typer's test runner hides what users see here (recent typer ships its own copy
of click, whose exceptions the ``click`` package's classes do not match), so
these tests run the console script that ``pip install`` put next to this
Python, in a subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("pfedmoap")


@pytest.mark.parametrize(
    "args, usage, words",
    [
        # older click (and typer 0.29's own copy of it) says "No such option: --nosuch", click 8.5 "No such option '--nosuch'."
        (["partition", "--nosuch"], "Usage: pfedmoap partition ", ("No such option", "--nosuch")),
        (["train", "--rounds", "abc"], "Usage: pfedmoap train ", ("Invalid value for '--rounds'",)),
        (["nosuchcommand"], "Usage: pfedmoap [OPTIONS] COMMAND", ("No such command 'nosuchcommand'",)),
        (["sweep"], "Usage: pfedmoap sweep ", ("Missing option '--table'",)),
    ],
)
def test_usage_errors_show_usage_and_exit_2(tmp_path, args, usage, words):
    """Exit 2, the usage line of the command that was run, and one ``Error:`` line naming what was wrong.

    The exact wording of click's messages varies between click versions, so the
    error line is checked for the words that matter (the message kind and the
    option or command it is about), not for one version's punctuation.
    """
    if not SCRIPT.exists():
        pytest.skip(f"no installed console script at {SCRIPT}")
    env = {k: v for k, v in os.environ.items() if k != "PFEDMOAP_DEBUG"}
    done = subprocess.run([str(SCRIPT), "--workspace", str(tmp_path / "ws"), *args], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.startswith(usage), done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, done.stderr
    for word in words:
        assert word in errors[0], (word, done.stderr)
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["download", "partition", "train", "evaluate", "report", "sweep"])
def test_help_keeps_bracketed_words(command):
    """Help is plain text: TOML table names such as "[train]" are printed, not eaten as rich markup."""
    import re

    from pfedmoap_cli.cli import app as app_module

    module = getattr(app_module, f"{command}_cmd")
    words = set(re.findall(r"\[[a-z_.]+\]", module.HELP))
    if not SCRIPT.exists():
        pytest.skip(f"no installed console script at {SCRIPT}")
    done = subprocess.run([str(SCRIPT), command, "--help"], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    for word in words:
        assert word in done.stdout, (word, done.stdout)
    assert "\\[" not in done.stdout, done.stdout  # "[default: ...]" / "[required]" unescaped
    if command == "partition":
        assert "[default: 1]" in done.stdout and "[required]" in done.stdout, done.stdout


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"PFEDMOAP_DEBUG", "PFEDMOAP_WORKSPACE", "PFEDMOAP_DATA"}}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


SMALL_SYNTHETIC = ("--dataset", "synthetic", "--iid", "--clients", "2", "--option", "train_per_class=1", "--option", "test_per_class=1")


def test_shared_options_work_after_the_subcommand_and_win_over_those_before(tmp_path):
    if not SCRIPT.exists():
        pytest.skip(f"no installed console script at {SCRIPT}")
    # after the subcommand only
    done = _run("partition", *SMALL_SYNTHETIC, "--workspace", str(tmp_path / "after"), "--data-root", str(tmp_path / "data"), "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert list((tmp_path / "after" / "partitions").glob("synthetic-iid-*.json"))
    # before and after: the one after the subcommand is used, the one before is left alone
    done = _run("--workspace", str(tmp_path / "before"), "partition", *SMALL_SYNTHETIC, "--workspace", str(tmp_path / "both"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert list((tmp_path / "both" / "partitions").glob("*.json")) and not (tmp_path / "before").exists()
    # before only still works, and nothing lands in the default workspace
    done = _run("--workspace", str(tmp_path / "front"), "partition", *SMALL_SYNTHETIC, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert list((tmp_path / "front" / "partitions").glob("*.json")) and not (tmp_path / "pfedmoap-workspace").exists()
    # every subcommand lists them
    for command in ("download", "partition", "train", "evaluate", "report", "sweep"):
        text = _run(command, "--help", cwd=tmp_path).stdout
        assert "--workspace" in text and "--data-root" in text and "--quiet" in text, command


@pytest.mark.parametrize("command", ["partition", "train", "evaluate", "report", "sweep", "download"])
def test_help_shows_conventional_metavars(command):
    """Every option that takes a value names it (N, NAME, KEY=VALUE, ...), not click's type names."""
    if not SCRIPT.exists():
        pytest.skip(f"no installed console script at {SCRIPT}")
    done = subprocess.run([str(SCRIPT), command, "--help"], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    option_lines = [line for line in done.stdout.splitlines() if line.lstrip().startswith("-")]
    assert option_lines, done.stdout
    for line in option_lines:
        names = line.split("  ")[0]
        assert not re.search(r"\b(TEXT|INTEGER|FLOAT|PATH)\b|<(str|int|bool|float)>", names), line
    if command == "train":
        assert "data_recipes/<dataset>.toml" in done.stdout and "--rounds N" in done.stdout, done.stdout
