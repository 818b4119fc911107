"""Start a real Flower (1.42) deployment on loopback for tests, and tear it down.

``FlowerDeployment`` runs ``flower-superlink`` and N ``flower-supernode`` as separate
processes (each in its own session/process group, logs in files under ``workdir``),
writes the SuperLink connection that ``flwr run`` needs, runs ``flwr run APP
<connection> --stream`` as a subprocess with a timeout, and on ``stop()`` /
``__exit__`` (also when the test failed) ends every process it started: SIGTERM,
then SIGKILL after ``stop_timeout`` seconds. Stdlib only.

Example (tests import helpers by module name; ``tests/`` is on ``sys.path``)::

    from flower_harness import FlowerDeployment

    @pytest.fixture
    def flower(tmp_path):
        with FlowerDeployment(tmp_path / "flower") as dep:
            yield dep

    def test_round(flower, tmp_path):
        flower.start_superlink()
        flower.add_supernodes([{"partition-id": i, "num-partitions": 3,
                                "data-root": str(tmp_path)} for i in range(3)])
        res = flower.run(APP_DIR, run_config={"num-rounds": 1}, timeout=300)
        assert res.ok, res.output  # exit code 0 AND run status finished:completed
        flower.kill_supernode(1)           # SIGKILL node + its SuperExec/ClientApp
        flower.restart_supernode(1)        # same node_config, NEW node id

Facts about Flower 1.42 this module relies on (checked against its source):

* The SuperLink serves its Fleet, Control and Runtime ("ServerAppIo") APIs over ONE
  HTTP port (``--host``/``--port``, default 8000); no other port is bound unless
  ``FLWR_INTERNAL_GRPC_*`` or ``--health-server-address`` is set. A SuperNode binds
  one port too (its ClientAppIo/Runtime HTTP API, ``--host``/``--port``, default
  9094). ``--clientappio-api-address`` and ``--serverappio-api-address`` are
  REJECTED by 1.42 ("use --host and --port instead").
* Both daemons start ``flower-superexec`` (and it ``flwr-serverapp`` /
  ``flwr-clientapp``) by bare name via ``PATH``; the SuperLink's SuperExec runs in
  its own session (``start_new_session=True``), so killing a process group is not
  enough. Every process started here carries ``FLWR_HARNESS_TAG`` in its
  environment, which all Flower descendants inherit; ``stop()`` and
  ``kill_supernode()`` find stragglers by that tag in ``/proc/*/environ``.
* ``flwr run`` reads SuperLink connections from ``$FLWR_HOME/config.toml``
  (``[superlink.<name>] address/insecure``), not from ``[tool.flwr.federations]``
  in the app's pyproject.toml; if that legacy table is present, ``flwr run``
  *rewrites* the app's pyproject.toml (comments it out) while migrating it.
* ``--node-config``/``--run-config`` strings are parsed by
  ``flwr.common.config.parse_config_args``: the regex
  ``(\\S+?)=('[^']*'|"[^"]*"|\\S+)`` then TOML. String values MUST be quoted
  (``key="v"`` TOML basic string with backslash escapes, or ``key='v'`` TOML
  literal string, no escapes); a quoted value may contain spaces but never its own
  quote character; an unquoted ``key=/x`` is a TOML error; tokens without ``=``
  are silently dropped. ``format_config`` produces safe strings. Run-config
  overrides must name keys of ``[tool.flwr.app.config]`` (else ``flwr run`` exits 1,
  "Invalid run configuration") and replace the value with the TOML type given
  (``timeout=5`` gives int 5 even if the default is 5.0).
* Runtime model: each run starts a fresh ``flwr-serverapp`` process (child of the
  SuperLink's SuperExec; cwd and environment inherited from ``flower-superlink``,
  so ``env``/``pythonpath`` here reach it); each message to a SuperNode starts a
  fresh ``flwr-clientapp`` process. The FAB is unpacked into
  ``$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash8>`` which is ``sys.path[0]``;
  components may also name modules of an installed package (``pkg.mod:app``).
  SuperNodes poll every 3 s and ``Grid.send_and_receive`` every 3 s, so one round
  costs several seconds even for trivial apps. A SIGKILLed node stays in
  ``get_node_ids()`` for about 60 s (heartbeat 30 s x patience 2, not configurable).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Environment every Flower process gets (no telemetry, no update check, no `uv sync`).
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
TAG_VAR = "FLWR_HARNESS_TAG"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LIVE: weakref.WeakSet = weakref.WeakSet()  # deployments to stop at interpreter exit


@atexit.register
def _stop_all() -> None:
    """Safety net: stop deployments a test forgot to stop (not run on SIGKILL)."""
    for dep in list(_LIVE):
        try:
            dep.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class FlowerHarnessError(RuntimeError):
    """A Flower process failed to start or become ready in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def format_config(values: Mapping[str, bool | int | float | str]) -> str:
    """Render ``values`` as a ``--node-config`` / ``--run-config`` string.

    Strings become TOML literal strings (``'...'``, no escape processing, so paths
    with backslashes/spaces are safe), or basic strings (``"..."``) if they contain
    a single quote. A string holding both quote characters, or a newline, cannot be
    expressed in Flower's format and raises ``ValueError``; so do keys that are not
    bare TOML keys (dots are allowed and mean nesting, e.g. ``a.b=1``).
    """
    parts = []
    for key, value in values.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key) or key.startswith(".") or ".." in key:
            raise ValueError(f"config key {key!r} is not a bare TOML key")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"{key}: non-finite float {value!r}")
            text = repr(value)
        elif isinstance(value, str):
            if any((ord(ch) < 32 and ch != "\t") or ord(ch) == 127 for ch in value):
                raise ValueError(f"{key}: control characters cannot be passed")
            if "'" not in value:
                text = f"'{value}'"
            elif '"' not in value:
                text = '"' + value.replace("\\", "\\\\") + '"'
            else:
                raise ValueError(f"{key}: a value cannot contain both ' and \"")
        else:
            raise TypeError(f"{key}: unsupported type {type(value).__name__}")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _tagged_pids(tag_prefix: str) -> list[int]:
    """Pids of live (non-zombie) processes whose environment has a matching tag."""
    needle = f"{TAG_VAR}={tag_prefix}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat.rpartition(")")[2].split()[0] == "Z":
            continue
        if any(var.startswith(needle) for var in env.split(b"\0")):
            found.append(int(entry))
    return found


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class ManagedProcess:
    """One Flower daemon started by the harness (``popen.pid`` leads its own group)."""

    name: str
    argv: list[str]
    log_path: Path
    tag: str
    port: int
    popen: subprocess.Popen | None = None
    log_offset: int = 0  # where the current life starts in the (appended) log file

    def alive(self) -> bool:
        """True while the leading process has not exited."""
        return self.popen is not None and self.popen.poll() is None

    def log(self, current_life_only: bool = False) -> str:
        """The log (stdout+stderr, ANSI colours removed); all lives, or only the current."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self.log_offset if current_life_only else 0)
                return _ANSI.sub("", fh.read().decode(errors="replace"))
        except FileNotFoundError:
            return ""


@dataclass
class SuperNode(ManagedProcess):
    """A SuperNode: its ``node_config`` string and the node id of its current life."""

    node_config: str = ""
    node_id: int | None = None
    starts: int = 0
    extra_args: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    """Outcome of ``flwr run``: exit code (None if killed on timeout) and output."""

    returncode: int | None
    output: str
    seconds: float
    timed_out: bool
    argv: list[str] = field(default_factory=list)
    status: str | None = None  # e.g. "finished:completed" / "finished:failed" (flwr ls)
    status_details: str | None = None

    @property
    def ok(self) -> bool:
        """``flwr run`` exited 0 and the run finished as completed."""
        return self.returncode == 0 and self.status == "finished:completed"

    @property
    def run_id(self) -> int | None:
        """Run id printed by ``flwr run`` ("Successfully started run N")."""
        match = re.search(r"Successfully started run (\d+)", self.output)
        return int(match.group(1)) if match else None

    def lines_with(self, prefix: str) -> list[str]:
        """Output lines starting with ``prefix``, prefix stripped (e.g. JSON records)."""
        return [line[len(prefix):] for line in self.output.splitlines() if line.startswith(prefix)]


class FlowerDeployment:
    """A SuperLink plus SuperNodes on 127.0.0.1, owned by one test.

    Parameters
    ----------
    workdir:
        Directory for logs, FLWR_HOME directories, the SuperLink database and the
        working directory of every process (the ServerApp/ClientApp processes inherit
        it as cwd). Created if missing.
    bin_dir:
        Directory holding ``flower-superlink`` etc.; default: next to ``sys.executable``,
        else found on ``PATH``. It is prepended to ``PATH`` of every process because
        Flower launches ``flower-superexec``/``flwr-serverapp``/``flwr-clientapp`` by name.
    pythonpath:
        Extra entries for ``PYTHONPATH`` of every process, ``flwr run`` included (its
        pre-flight check imports the component modules with ``find_spec``).
    env:
        Extra environment variables for every process.
    database:
        ``True``: SQLite file in ``workdir``; ``False``: Flower's in-memory state.
    ready_timeout / stop_timeout:
        Bounds (seconds) for a daemon to become ready / to exit after SIGTERM.
    """

    CONNECTION = "harness"

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        bin_dir: str | os.PathLike | None = None,
        pythonpath: Sequence[str | os.PathLike] = (),
        env: Mapping[str, str] | None = None,
        database: bool = True,
        ready_timeout: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bin_dir = Path(bin_dir) if bin_dir else self._find_bin_dir()
        self.pythonpath = [str(Path(p).resolve()) for p in pythonpath]
        self.extra_env = dict(env or {})
        self.database = database
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.session = uuid.uuid4().hex[:12]
        self.superlink: ManagedProcess | None = None
        self.supernodes: list[SuperNode] = []
        self._runs: list[subprocess.Popen] = []
        _LIVE.add(self)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _find_bin_dir() -> Path:
        here = Path(sys.executable).parent
        if (here / "flower-superlink").exists():
            return here
        found = shutil.which("flower-superlink")
        if not found:
            raise FlowerHarnessError("flower-superlink not found next to python or on PATH")
        return Path(found).parent

    def home(self, name: str) -> Path:
        """The FLWR_HOME used by process ``name`` (``superlink``, ``supernode-0``, ``cli``)."""
        path = self.workdir / "home" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def environ(self, name: str) -> dict[str, str]:
        """Environment for process ``name``: FLOWER_ENV, own FLWR_HOME, PATH, PYTHONPATH, tag."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_INTERNAL_")}
        env.update(FLOWER_ENV)
        env.update(self.extra_env)
        env["FLWR_HOME"] = str(self.home(name))
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", "")])
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(
                self.pythonpath + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
            )
        env[TAG_VAR] = f"{self.session}/{name}/"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self, proc: ManagedProcess) -> None:
        with open(proc.log_path, "ab") as log:
            proc.log_offset = log.tell()
            log.write(f"### harness: {' '.join(proc.argv)}\n".encode())
            log.flush()
            proc.popen = subprocess.Popen(  # noqa: S603
                proc.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.environ(proc.tag),
                start_new_session=True,
            )

    def _wait(self, proc: ManagedProcess, ready, what: str, timeout: float | None = None):
        """Poll ``ready()`` until truthy; raise with the log tail if the process dies."""
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        while time.monotonic() < deadline:
            result = ready()
            if result:
                return result
            if not proc.alive():
                raise FlowerHarnessError(
                    f"{proc.name} exited (rc={proc.popen.returncode}) before {what}:\n"
                    + proc.log()[-3000:]
                )
            time.sleep(0.1)
        raise FlowerHarnessError(f"{proc.name}: no {what} within timeout:\n" + proc.log()[-3000:])

    # ------------------------------------------------------------------ daemons
    @property
    def address(self) -> str:
        """``127.0.0.1:<port>`` of the SuperLink (Fleet = Control = Runtime API)."""
        if self.superlink is None:
            raise FlowerHarnessError("SuperLink not started")
        return f"127.0.0.1:{self.superlink.port}"

    def start_superlink(self, *extra_args: str) -> ManagedProcess:
        """Start ``flower-superlink --insecure`` on a free port; wait until it listens.

        Also writes ``config.toml`` (connection ``harness``) into the CLI's FLWR_HOME.
        """
        if self.superlink is not None and self.superlink.alive():
            raise FlowerHarnessError("SuperLink already running")
        port = free_port()
        argv = [str(self.bin_dir / "flower-superlink"), "--insecure",
                "--host", "127.0.0.1", "--port", str(port)]
        if self.database:
            argv += ["--database", str(self.workdir / f"superlink-{self.session}.db")]
        argv += list(extra_args)
        proc = ManagedProcess("superlink", argv, self.workdir / "superlink.log", "superlink", port)
        self.superlink = proc
        self._spawn(proc)
        self._wait(proc, lambda: _port_open(port) and "startup complete" in proc.log(True),
                   "listening port")
        (self.home("cli") / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.CONNECTION}"\n\n'
            f'[superlink.{self.CONNECTION}]\naddress = "{self.address}"\ninsecure = true\n'
        )
        return proc

    def add_supernode(self, node_config: str | Mapping[str, bool | int | float | str] = "",
                      *extra_args: str) -> SuperNode:
        """Start a SuperNode with ``node_config`` (string, passed verbatim, or mapping,
        rendered by ``format_config``); wait until the SuperLink has activated it.
        It becomes ``self.supernodes[i]`` (name ``supernode-i``)."""
        return self.add_supernodes([node_config], *extra_args)[0]

    def add_supernodes(self, node_configs: Iterable[str | Mapping], *extra_args: str
                       ) -> list[SuperNode]:
        """Start several SuperNodes concurrently (faster than one by one) and wait for
        all of them; ``extra_args`` are appended to every command line."""
        nodes = []
        for node_config in node_configs:
            if isinstance(node_config, Mapping):
                node_config = format_config(node_config)
            index = len(self.supernodes)
            node = SuperNode(f"supernode-{index}", [], self.workdir / f"supernode-{index}.log",
                             f"supernode-{index}", 0, node_config=node_config,
                             extra_args=list(extra_args))
            self.supernodes.append(node)
            nodes.append(node)
            self._spawn_supernode(node)
        for node in nodes:
            self._await_supernode(node)
        return nodes

    def _spawn_supernode(self, node: SuperNode) -> None:
        node.port = free_port()
        node.argv = [str(self.bin_dir / "flower-supernode"), "--insecure",
                     "--superlink", self.address,
                     "--host", "127.0.0.1", "--port", str(node.port)]
        if node.node_config:
            node.argv += ["--node-config", node.node_config]
        node.argv += node.extra_args
        node.starts += 1
        node.node_id = None
        self._spawn(node)

    def _await_supernode(self, node: SuperNode) -> None:
        def registered():
            match = re.search(r"SuperNode ID: (\d+)", node.log(current_life_only=True))
            return int(match.group(1)) if match else None

        node.node_id = self._wait(node, registered, "'SuperNode ID' in log")
        assert self.superlink is not None
        self._wait(node, lambda: f"Activated node_id={node.node_id}" in self.superlink.log(True),
                   "activation at the SuperLink")

    def kill_supernode(self, index: int) -> None:
        """SIGKILL SuperNode ``index`` with its SuperExec and ClientApp processes."""
        node = self.supernodes[index]
        tag = f"{self.session}/{node.tag}/"
        pids = set(_tagged_pids(tag))
        if node.alive():
            pids.add(node.popen.pid)
            try:
                os.killpg(node.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _signal(pids, signal.SIGKILL)
        if node.popen is not None:
            node.popen.wait(timeout=self.stop_timeout)
        deadline = time.monotonic() + self.stop_timeout
        while _tagged_pids(tag) and time.monotonic() < deadline:
            _signal(_tagged_pids(tag), signal.SIGKILL)
            time.sleep(0.05)

    def restart_supernode(self, index: int) -> SuperNode:
        """Start SuperNode ``index`` again (same node_config, new port); kill it first
        if it still runs. The SuperLink assigns it a NEW node id (``.node_id``)."""
        node = self.supernodes[index]
        if node.alive() or _tagged_pids(f"{self.session}/{node.tag}/"):
            self.kill_supernode(index)
        self._spawn_supernode(node)
        self._await_supernode(node)
        return node

    # ------------------------------------------------------------------ flwr run
    def flwr_argv(self, app_dir: str | os.PathLike, run_config=None, *, stream: bool = True,
                  extra_args: Sequence[str] = ()) -> list[str]:
        """Command line of ``flwr run APP harness [--run-config ...] [--stream]``.

        ``run_config``: mapping (rendered by ``format_config``), a string, a path to a
        ``.toml`` file, or a list of those strings. Keys must exist in the app's
        ``[tool.flwr.app.config]``.
        """
        argv = [str(self.bin_dir / "flwr"), "run", str(Path(app_dir).resolve()), self.CONNECTION]
        if run_config is None:
            items = []
        elif isinstance(run_config, (str, Mapping, os.PathLike)):
            items = [run_config]
        else:
            items = list(run_config)
        for item in items:
            text = format_config(item) if isinstance(item, Mapping) else str(item)
            if text:
                argv += ["--run-config", text]
        if stream:
            argv.append("--stream")
        return argv + list(extra_args)

    def start_run(self, app_dir, run_config=None, *, stream: bool = True,
                  extra_args: Sequence[str] = ()) -> subprocess.Popen:
        """Start ``flwr run`` in the background; its stdout+stderr go to
        ``popen.log_path`` (``workdir/flwr-run-N.log``). Finish it with ``wait_run``."""
        argv = self.flwr_argv(app_dir, run_config, stream=stream, extra_args=extra_args)
        log_path = self.workdir / f"flwr-run-{len(self._runs)}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(  # noqa: S603
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir, env=self.environ("cli"), start_new_session=True,
            )
        popen.log_path = log_path  # type: ignore[attr-defined]
        popen.started_at = time.monotonic()  # type: ignore[attr-defined]
        self._runs.append(popen)
        return popen

    def wait_run(self, popen: subprocess.Popen, timeout: float = 300.0) -> RunResult:
        """Wait for a ``start_run`` process. On timeout kill it (``timed_out=True``) and
        ask the SuperLink to stop the run (``flwr stop``) so it cannot leak into the
        next run; ``stop()`` would end a still-running ServerApp anyway."""
        timed_out = False
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            popen.wait()
        started = getattr(popen, "started_at", time.monotonic())
        seconds = time.monotonic() - started
        log_path = Path(popen.log_path)  # type: ignore[attr-defined]
        text = log_path.read_bytes().decode(errors="replace")
        result = RunResult(None if timed_out else popen.returncode, _ANSI.sub("", text),
                           seconds, timed_out, list(popen.args))
        if timed_out and result.run_id is not None:
            self.flwr("stop", str(result.run_id), self.CONNECTION, timeout=30)
        return result

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run another ``flwr`` CLI command (e.g. ``"ls", "harness"``) with this
        deployment's CLI environment; raises ``subprocess.TimeoutExpired`` on timeout."""
        return subprocess.run([str(self.bin_dir / "flwr"), *args],  # noqa: S603
                              capture_output=True, text=True, timeout=timeout,
                              cwd=self.workdir, env=self.environ("cli"))

    def run(self, app_dir, run_config=None, *, timeout: float = 300.0, stream: bool = True,
            extra_args: Sequence[str] = (), status: bool = True) -> RunResult:
        """Run ``flwr run APP harness --stream`` to completion (bounded by ``timeout``).

        With ``--stream`` the command returns when the run has finished and prints the
        ServerApp's stdout/stderr/logs (ClientApp prints go to the SuperNode logs). Its
        exit code is 0 even if the ServerApp raised (output then holds "ServerApp raised
        an exception" and "Exit Code: 201"); it is 1 for CLI errors (invalid app config,
        unknown/ill-formed --run-config key, unimportable component, no SuperLink).
        With ``status`` (and a run id) the run's final state is fetched via ``flwr ls``
        (about 1.5 s) into ``RunResult.status``; use ``RunResult.ok``.
        """
        result = self.wait_run(self.start_run(app_dir, run_config, stream=stream,
                                              extra_args=extra_args), timeout)
        if status and stream and not result.timed_out and result.run_id is not None:
            info = self.run_info(result.run_id)
            result.status, result.status_details = info.get("status"), info.get("status-details")
        return result

    def run_info(self, run_id: int, timeout: float = 60.0) -> dict:
        """The run's record from ``flwr ls --run-id ID --format json`` ({} if unavailable);
        keys include ``status`` ("pending", "running", "finished:completed",
        "finished:failed", "finished:stopped"), ``status-details``, ``elapsed``."""
        try:
            proc = self.flwr("ls", self.CONNECTION, "--run-id", str(run_id), "--format", "json",
                             timeout=timeout)
            runs = json.loads(proc.stdout).get("runs", [])
        except (subprocess.TimeoutExpired, ValueError):
            return {}
        return runs[0] if runs else {}

    # ------------------------------------------------------------------ teardown
    def live_pids(self) -> list[int]:
        """Pids of every live process started by this deployment (any depth)."""
        pids = set(_tagged_pids(f"{self.session}/"))
        for proc in [self.superlink, *self.supernodes]:
            if proc is not None and proc.alive():
                pids.add(proc.popen.pid)
        pids.update(p.pid for p in self._runs if p.poll() is None)
        return sorted(pids)

    def stop(self) -> None:
        """SIGTERM every process group and tagged process, SIGKILL what is left after
        ``stop_timeout``; reap the direct children. Idempotent."""
        leaders = [p.popen for p in [*self.supernodes, self.superlink] if p and p.popen]
        leaders += self._runs
        tag = f"{self.session}/"

        def all_gone() -> bool:
            return all(p.poll() is not None for p in leaders) and not _tagged_pids(tag)

        for sig in (signal.SIGTERM, signal.SIGKILL):
            for popen in leaders:
                if popen.poll() is None:
                    try:
                        os.killpg(popen.pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            _signal(_tagged_pids(tag), sig)
            deadline = time.monotonic() + self.stop_timeout
            while not all_gone() and time.monotonic() < deadline:
                time.sleep(0.1)
            if all_gone():
                break
        for popen in leaders:
            try:
                popen.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> FlowerDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
