"""Mutation testing over the RULES of PROTOCOL.md (sections 2-6): which protocol violations does the test suite catch?

What it is
----------
A measurement tool. ``scripts/protocol_mutants.toml`` lists *mutants*: each one
breaks one specific rule of ../shared/PROTOCOL.md (the rule and its section
are named in the entry) with a minimal textual change to one source file. For
every mutant the runner

1. works in a PRIVATE COPY of the repository (``pfedmoap_cli/``, ``tests/``,
   ``data_recipes/``, ``pyproject.toml``, ``setup.py``, and ``scripts/``, which
   tests/test_microclip.py imports, copied once into a temporary directory;
   the source tree itself is never modified),
2. replaces the mutant's ``old`` text (which must occur exactly once in the
   file) by its ``new`` text,
3. runs pytest there (``-x -q -p no:cacheprovider``, ``OMP_NUM_THREADS=1``,
   ``PYTHONPATH=<copy>`` first, so ``import pfedmoap_cli`` -- also in
   subprocesses, ``python -m pfedmoap_cli`` and the ``pfedmoap`` console
   script, whose wrapper is put first on ``PATH`` -- resolves to the copy and
   not to the editable install), with a wall-clock timeout,
4. restores the file in the copy.

Status per mutant: ``killed`` (some test failed: the suite notices the broken
rule), ``survived`` (every test that ran passed: the suite lets a user get
wrong numbers without noticing), ``timeout`` (counted as killed, reported as
such), ``not-applicable`` (``old`` is not found exactly once: the code moved
on; update the entry), ``error`` (pytest could not run the selection, e.g. a
test id that no longer exists -- a harness problem, not a verdict).

Before the mutants, the runner checks that the copy really is what Python
imports (a probe line is added to the copy's ``pfedmoap_cli/__init__.py`` and
must show up through ``python -c``, ``python -m pfedmoap_cli`` and the
``pfedmoap`` console script), and -- unless ``--no-baseline`` -- that the
unmutated tests pass (otherwise every mutant would look killed).

How to run
----------
From the repository root::

    .venv/bin/python scripts/protocol_mutants.py                  # every mutant
    .venv/bin/python scripts/protocol_mutants.py --list           # the mutants, and whether each still applies
    .venv/bin/python scripts/protocol_mutants.py --only fedavg-unweighted-pfedmoap cosine-schedule-removed
    .venv/bin/python scripts/protocol_mutants.py --full           # ignore the per-mutant ``tests`` narrowing
    .venv/bin/python scripts/protocol_mutants.py --confirm-survivors --json /tmp/mutants.json

To measure a commit other than the working tree (and so be safe from
concurrent edits)::

    git worktree add /tmp/mutbase HEAD
    .venv/bin/python scripts/protocol_mutants.py --repo /tmp/mutbase --mutants scripts/protocol_mutants.toml
    git worktree remove /tmp/mutbase

The exit status is 0 whatever the verdicts (it measures; it does not gate),
2 when the harness itself cannot work, and 1 with ``--fail-on-survivors``
when a mutant survived.

How to add a mutant
-------------------
Append a ``[[mutant]]`` table to ``scripts/protocol_mutants.toml``::

    [[mutant]]
    id = "short-kebab-name"                  # unique
    rule = "§3 step 4: FedAvg weights n_i"   # the PROTOCOL.md rule it breaks, with its section
    file = "pfedmoap_cli/methods/promptfl.py" # relative to the repository root
    old = 'exact text, found exactly once in the file'
    new = 'its replacement'
    tests = ["tests/test_engine.py"]         # optional: run only these (pytest ids/paths)

``tests`` may end with ``"..."``: then the listed files run FIRST and every
other ``tests/test_*.py`` after them -- still the whole suite (so not a
narrowing), but with ``-x`` a mutant that the listed tests kill stops early.

Keep it a minimal (usually one-line) change that gives a user wrong numbers,
check it with ``--list`` (it must say ``ok``) and run it with ``--only ID``.
TOML literal strings ('...') keep backslashes and double quotes as they are.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

COPIED = ("pfedmoap_cli", "tests", "data_recipes", "pyproject.toml", "setup.py", "scripts")  # tests/test_microclip.py imports scripts/
MUTABLE_ROOTS = ("pfedmoap_cli/", "data_recipes/")
PYTEST_FLAGS = ("-x", "-q", "-p", "no:cacheprovider")
PROBE_ENV = "PFEDMOAP_MUTANT_PROBE"
KILLED, SURVIVED, TIMEOUT, NOT_APPLICABLE, ERROR = "killed", "survived", "timeout", "not-applicable", "error"


class HarnessError(RuntimeError):
    """The harness cannot measure (bad mutant file, copy not imported, baseline failing)."""


@dataclass(frozen=True)
class Mutant:
    id: str
    rule: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...] = ()


@dataclass
class Result:
    id: str
    rule: str
    status: str
    seconds: float
    tests: list[str]
    first_failure: str = ""
    detail: str = ""
    whole_suite: bool = True  # False: a narrowed run (a survivor is only a candidate)
    confirmed_on_full_suite: bool | None = None
    output_tail: str = field(default="", repr=False)


# ---- the mutant list ------------------------------------------------------------------------
def load_mutants(path: Path) -> list[Mutant]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise HarnessError(f"cannot read {path}: {error}") from None
    entries = data.get("mutant")
    if not isinstance(entries, list) or not entries:
        raise HarnessError(f"{path} has no [[mutant]] entries")
    mutants, seen = [], set()
    for number, entry in enumerate(entries, 1):
        missing = [k for k in ("id", "rule", "file", "old", "new") if not isinstance(entry.get(k), str)]
        if missing:
            raise HarnessError(f"{path}: mutant #{number} ({entry.get('id', '?')}) lacks string field(s) {', '.join(missing)}")
        unknown = set(entry) - {"id", "rule", "file", "old", "new", "tests"}
        if unknown:
            raise HarnessError(f"{path}: mutant {entry['id']} has unknown field(s) {', '.join(sorted(unknown))}")
        if entry["id"] in seen:
            raise HarnessError(f"{path}: mutant id {entry['id']!r} is used twice")
        seen.add(entry["id"])
        if not entry["file"].startswith(MUTABLE_ROOTS) or ".." in Path(entry["file"]).parts:
            raise HarnessError(f"{path}: mutant {entry['id']} mutates {entry['file']!r}; only files under {' or '.join(MUTABLE_ROOTS)} may be mutated")
        if entry["old"] == entry["new"] or not entry["old"]:
            raise HarnessError(f"{path}: mutant {entry['id']} changes nothing")
        tests = entry.get("tests", [])
        if isinstance(tests, str):
            tests = [tests]
        if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
            raise HarnessError(f"{path}: mutant {entry['id']}: tests must be a list of strings")
        mutants.append(Mutant(entry["id"], entry["rule"], entry["file"], entry["old"], entry["new"], tuple(tests)))
    return mutants


def applicability(repo: Path, mutant: Mutant) -> tuple[bool, str]:
    path = repo / mutant.file
    if not path.is_file():
        return False, f"{mutant.file} does not exist"
    count = path.read_text().count(mutant.old)
    if count != 1:
        return False, f"old text found {count} times in {mutant.file} (must be exactly once)"
    return True, ""


# ---- private copies -------------------------------------------------------------------------
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.egg-info")


def make_copy(repo: Path, root: Path, python: str) -> dict[str, str]:
    """Copy the measured trees into ``root``; return the environment that imports them first."""
    for name in COPIED:
        source = repo / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=_IGNORE, symlinks=True)
        elif source.is_file():
            shutil.copy2(source, root / name)
        elif name in ("pfedmoap_cli", "tests"):
            raise HarnessError(f"{repo} has no {name}/; is --repo the repository root?")
    bin_dir = root / ".mutant-bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "pfedmoap"
    # The console script, bound to the copy whatever the installed entry point says.
    wrapper.write_text(f'#!/bin/sh\nexec "{python}" -m pfedmoap_cli "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ)
    env.pop(PROBE_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutant of the same size in the same second must not hit a stale .pyc
    env["PYTHONHASHSEED"] = "0"
    for key in ("PFEDMOAP_WORKSPACE", "PFEDMOAP_RECIPES", "PFEDMOAP_DEBUG"):
        env.pop(key, None)
    return env


def check_copy_is_imported(root: Path, env: dict[str, str], python: str) -> None:
    """A trivially visible mutant of the copy must show through every way the tests start the package."""
    init = root / "pfedmoap_cli" / "__init__.py"
    original = init.read_text()
    marker = f"MUTANT-PROBE:{root}"
    init.write_text(original + f"\nimport os as _o\nif _o.environ.get({PROBE_ENV!r}):\n    print({marker!r}, flush=True)\n")
    probe_env = {**env, PROBE_ENV: "1"}
    commands = {
        "import": [python, "-c", "import pfedmoap_cli"],
        "python -m pfedmoap_cli": [python, "-m", "pfedmoap_cli", "--version"],
        "pfedmoap console script (PATH)": ["pfedmoap", "--version"],
    }
    installed = Path(python).parent / "pfedmoap"
    if installed.is_file():
        commands["installed console script"] = [str(installed), "--version"]
    try:
        for what, command in commands.items():
            run = subprocess.run(command, cwd=root, env=probe_env, capture_output=True, text=True, timeout=300)
            if marker not in run.stdout:
                raise HarnessError(
                    f"the private copy is not what '{what}' imports (probe missing; rc={run.returncode}): "
                    f"{(run.stdout + run.stderr).strip()[-400:]}"
                )
    finally:
        init.write_text(original)


# ---- running pytest -------------------------------------------------------------------------
_LIVE: set[subprocess.Popen] = set()  # running pytest processes (each leads its own process group)
_TEMP_DIRS: list[Path] = []


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # pytest and anything it started
    except (ProcessLookupError, PermissionError):
        pass


def _on_signal(signum, frame) -> None:  # noqa: ARG001
    """Stopping the harness stops its pytest runs and removes its copies (no orphans, no leftovers)."""
    for process in list(_LIVE):
        _kill_group(process)
    for path in _TEMP_DIRS:
        shutil.rmtree(path, ignore_errors=True)
    print(f"protocol_mutants: stopped by signal {signum}", file=sys.stderr, flush=True)
    os._exit(130)


def run_pytest(root: Path, env: dict[str, str], python: str, selection: tuple[str, ...], timeout: float) -> tuple[int | None, str, float]:
    """(return code or None on timeout, combined output, seconds)."""
    command = [python, "-m", "pytest", *PYTEST_FLAGS, *(selection or ("tests",))]
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _LIVE.add(process)
    try:
        output, _ = process.communicate(timeout=timeout)
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        _kill_group(process)
        output, _ = process.communicate()
        code = None
    finally:
        _LIVE.discard(process)
    return code, output or "", time.monotonic() - start


_FAILED = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)


def first_failure(output: str) -> str:
    match = _FAILED.search(output)
    if match:
        return match.group(2)
    match = re.search(r"^_{3,} (?:ERROR collecting )?(\S.*?) _{3,}$", output, re.MULTILINE)
    return match.group(1) if match else ""


def verdict(code: int | None, output: str) -> tuple[str, str]:
    if code is None:
        return TIMEOUT, "wall-clock timeout"
    if code == 0:
        return SURVIVED, ""
    if code in (1, 2):  # tests failed / collection or import broke (the mutant broke the package)
        return KILLED, "" if code == 1 else "collection/import error"
    if code == 5:
        return ERROR, "pytest collected no tests (check the mutant's tests)"
    if code == 4:
        return ERROR, "pytest usage error (a test id in 'tests' does not exist?)"
    return ERROR, f"pytest exited {code}"


REST = "..."


def narrowed(mutant: Mutant) -> bool:
    """Whether the mutant runs less than the whole suite."""
    return bool(mutant.tests) and REST not in mutant.tests


def expand(root: Path, tests: tuple[str, ...]) -> tuple[str, ...]:
    """The pytest arguments: ``tests`` as given, ``...`` replaced by every other tests/test_*.py."""
    if REST not in tests:
        return tests
    listed = [t for t in tests if t != REST]
    files = {t.split("::")[0] for t in listed}
    rest = [f"tests/{p.name}" for p in sorted((root / "tests").glob("test_*.py")) if f"tests/{p.name}" not in files]
    if any("::" in t for t in listed):
        raise HarnessError(f"'...' may only follow whole test files, not test ids: {listed}")
    return (*listed, *rest)


def apply_and_test(mutant: Mutant, root: Path, env: dict[str, str], python: str, timeout: float, full: bool) -> Result:
    selection = () if full else expand(root, mutant.tests)
    shown = list(mutant.tests if mutant.tests and not full else ("tests",))
    ok, why = applicability(root, mutant)
    if not ok:
        return Result(mutant.id, mutant.rule, NOT_APPLICABLE, 0.0, shown, detail=why)
    path = root / mutant.file
    original = path.read_text()
    try:
        path.write_text(original.replace(mutant.old, mutant.new, 1))
        code, output, seconds = run_pytest(root, env, python, selection, timeout)
    finally:
        path.write_text(original)
    status, detail = verdict(code, output)
    failure = first_failure(output) if status in (KILLED, ERROR) else ""
    whole = full or not narrowed(mutant)
    if status == SURVIVED and not whole:
        detail = "narrowed run: a candidate until the whole suite confirms it"
    return Result(mutant.id, mutant.rule, status, round(seconds, 1), shown, failure, detail, whole, None, output[-3000:])


# ---- reporting ------------------------------------------------------------------------------
def line(result: Result, id_width: int) -> str:
    status = result.status + (" (confirmed, full suite)" if result.confirmed_on_full_suite else "")
    if result.confirmed_on_full_suite is False:
        status = f"{result.status} (by the full suite)"
    text = f"{result.id:<{id_width}}  {status:<16}  {result.seconds:7.1f}s"
    if result.first_failure:
        text += f"  {result.first_failure}"
    if result.detail:
        text += f"  [{result.detail}]"
    return text


def summary(results: list[Result]) -> str:
    count = lambda status: sum(r.status == status for r in results)  # noqa: E731
    killed, timeouts = count(KILLED) + count(TIMEOUT), count(TIMEOUT)
    text = f"{killed} killed, {count(SURVIVED)} survived, {count(NOT_APPLICABLE)} not applicable"
    extras = []
    if timeouts:
        extras.append(f"{timeouts} of the killed by timeout")
    if count(ERROR):
        extras.append(f"{count(ERROR)} harness errors")
    return text + (f" ({'; '.join(extras)})" if extras else "")


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=here.parent, help="source tree to measure (default: the repository holding this script)")
    parser.add_argument("--mutants", type=Path, default=here / "protocol_mutants.toml", help="the mutant list (default: next to this script)")
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants, in this order")
    parser.add_argument("--list", action="store_true", help="list the mutants and whether each applies to --repo, then exit")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested in parallel, one private copy each (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="wall-clock seconds per mutant (default 600); a timeout counts as killed")
    parser.add_argument("--full", action="store_true", help="ignore each mutant's 'tests' and run the whole tests/ directory")
    parser.add_argument("--tests", nargs="+", metavar="TEST", help="run these tests for every selected mutant instead of its own 'tests' (a narrowing unless it ends with '...')")
    parser.add_argument("--confirm-survivors", action="store_true", help="re-run every survivor of a narrowed run on the whole suite")
    parser.add_argument("--no-baseline", action="store_true", help="skip the check that the unmutated tests pass")
    parser.add_argument("--json", type=Path, help="write the results (and the settings) to this file")
    parser.add_argument("--python", default=sys.executable, help="interpreter with pytest and the dependencies (default: this one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies (their paths are printed)")
    parser.add_argument("--fail-on-survivors", action="store_true", help="exit 1 when a mutant survived")
    args = parser.parse_args(argv)

    try:
        repo = args.repo.resolve()
        mutants = load_mutants(args.mutants)
        if args.only:
            unknown = sorted(set(args.only) - {m.id for m in mutants})
            if unknown:
                raise HarnessError(f"unknown mutant id(s): {', '.join(unknown)}; see --list")
            by_id = {m.id: m for m in mutants}
            mutants = [by_id[i] for i in dict.fromkeys(args.only)]  # in the order given
        if args.tests:
            if args.full:
                raise HarnessError("--tests and --full contradict each other")
            mutants = [replace(m, tests=tuple(args.tests)) for m in mutants]
        id_width = max(len(m.id) for m in mutants)
        if args.list:
            for m in mutants:
                ok, why = applicability(repo, m)
                tests = " ".join(m.tests) if m.tests else "tests/ (all)"
                print(f"{m.id:<{id_width}}  {'ok' if ok else NOT_APPLICABLE:<14}  {m.rule}")
                print(f"{'':<{id_width}}  {m.file}; runs {tests}" + (f"  [{why}]" if why else ""))
            return 0
        if args.jobs < 1:
            raise HarnessError("--jobs must be at least 1")
        results = run_all(args, repo, mutants, id_width)
    except HarnessError as error:
        print(f"protocol_mutants: {error}", file=sys.stderr)
        return 2
    print(summary(results))
    if args.json:
        payload = {
            "repo": str(repo),
            "mutants_file": str(args.mutants.resolve()),
            "timeout_s": args.timeout,
            "full": args.full,
            "summary": summary(results),
            "results": [{k: v for k, v in asdict(r).items() if k != "output_tail" or r.status in (ERROR, TIMEOUT)} for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.fail_on_survivors and any(r.status == SURVIVED for r in results):
        return 1
    return 0


def run_all(args: argparse.Namespace, repo: Path, mutants: list[Mutant], id_width: int) -> list[Result]:
    jobs = min(args.jobs, len(mutants))
    base = Path(tempfile.mkdtemp(prefix="protocol-mutants-"))
    if not args.keep:
        _TEMP_DIRS.append(base)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    copies: queue.Queue[tuple[Path, dict[str, str]]] = queue.Queue()
    printing = threading.Lock()
    try:
        for index in range(jobs):
            root = base / f"copy{index}"
            root.mkdir()
            env = make_copy(repo, root, args.python)
            check_copy_is_imported(root, env, args.python)
            copies.put((root, env))
        print(f"measuring {repo} with {len(mutants)} mutant(s) in {base} ({jobs} job(s), timeout {args.timeout:.0f}s)", flush=True)
        if not args.no_baseline:
            baseline(args, repo, copies, mutants)

        def work(mutant: Mutant) -> Result:
            root, env = copies.get()
            try:
                result = apply_and_test(mutant, root, env, args.python, args.timeout, args.full)
                if result.status == SURVIVED and args.confirm_survivors and narrowed(mutant) and not args.full:
                    again = apply_and_test(mutant, root, env, args.python, args.timeout, True)
                    result.seconds = round(result.seconds + again.seconds, 1)
                    result.whole_suite = True
                    if again.status == SURVIVED:
                        result.confirmed_on_full_suite, result.tests, result.detail = True, ["tests"], ""
                    else:
                        result.status, result.confirmed_on_full_suite = again.status, False
                        result.first_failure, result.detail, result.tests = again.first_failure, again.detail, ["tests"]
            finally:
                copies.put((root, env))
            with printing:
                print(line(result, id_width), flush=True)
                if result.status == ERROR:
                    print(textwrap.indent(result.output_tail[-1500:], "    | "), flush=True)
            return result

        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(work, mutants))
    finally:
        if args.keep:
            print(f"copies kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return results


def baseline(args: argparse.Namespace, repo: Path, copies: queue.Queue, mutants: list[Mutant]) -> None:
    """The unmutated tests this run will use must pass, or no verdict means anything."""
    selections: list[str] = []
    mutants = [m for m in mutants if applicability(repo, m)[0]]  # a mutant that does not apply runs nothing
    if not mutants:
        return
    if args.full or any(not narrowed(m) for m in mutants):
        selections = ["tests"]
    else:
        for m in mutants:
            selections.extend(t for t in m.tests if t not in selections)
    root, env = copies.get()
    try:
        print(f"baseline: unmutated {' '.join(selections)} ...", flush=True)
        code, output, seconds = run_pytest(root, env, args.python, tuple(selections), max(args.timeout, 1800.0))
    finally:
        copies.put((root, env))
    if code != 0:
        raise HarnessError(
            f"the UNMUTATED tests fail or time out (rc={code}, first failure {first_failure(output) or '?'}), so mutants cannot be judged; "
            f"fix the tests or pass --no-baseline.\n{output[-1500:]}"
        )
    print(f"baseline passed in {seconds:.0f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
