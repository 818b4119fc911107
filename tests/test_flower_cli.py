"""``pfedmoap train --engine flower`` through the command line.

1. Flower's real simulation runtime (Ray), started by the installed console
   script in a subprocess, writes bit for bit the run files of the local
   engine (pFedMoAP; PromptFL resumed on Flower after a local start, which also
   shows that the engine is not part of the run id). Two simulations only:
   each costs tens of seconds of Ray start-up on a small machine.
2. Usage errors of the new options: exit 2, one line naming the fix.
3. ``--write-flower-app DIR`` writes the app a deployment runs, with the
   resolved settings of the run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_flower

require_flower()  # without Flower: skipped, or failed where PFEDMOAP_REQUIRE_FLOWER=1 (CI)

from conftest import one_line_error  # noqa: E402
from test_flower_runtime import assert_same_run_files, metric_rows  # noqa: E402

from pfedmoap_cli.engine.workspace import RunPaths  # noqa: E402

SCRIPT = Path(sys.executable).with_name("pfedmoap")
PARTITION = ("partition", "--dataset", "synthetic", "--iid", "--clients", "4", "--seed", "1",
             "--option", "train_per_class=1", "--option", "test_per_class=1")
#: 2 rounds, 2 of the 4 clients per round, the tiny ViT.
TRAIN = ("train", "--rounds", "2", "--local-epochs", "1", "--frac", "0.5", "--n-ctx", "2", "--batch-size", "4",
         "--lr", "0.05", "--backbone", "tiny-vit", "--pretrained", "none", "--device", "cpu", "--eval-batch-size", "64",
         "--per-client")  # a Flower node trains its client alone: bit-equal to the local per-client path
METHOD_FLAGS = {
    "pfedmoap": ("--method", "pfedmoap", "--gating-dim", "16", "--gating-heads", "4"),
    "promptfl": ("--method", "promptfl"),
}


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PFEDMOAP_DEBUG", "PFEDMOAP_WORKSPACE"}}
    env["OMP_NUM_THREADS"] = "1"
    return env


def script(workspace: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``pfedmoap --quiet --workspace WS ARGS`` through the installed console script."""
    if not SCRIPT.exists():
        pytest.skip(f"no installed console script at {SCRIPT}")
    return subprocess.run(
        [str(SCRIPT), "--quiet", "--workspace", str(workspace), *args],
        capture_output=True, text=True, timeout=timeout, env=environment(),
    )


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str


def in_process(workspace: Path, *args: str) -> Result:
    """``pfedmoap --quiet --workspace WS ARGS`` through ``main()`` in this process (no start-up cost)."""
    from pfedmoap_cli.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["pfedmoap", "--quiet", "--workspace", str(workspace), *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
    return Result(code, out.getvalue(), err.getvalue())


def run_paths(workspace: Path, run_id: str) -> RunPaths:
    return RunPaths(workspace / "runs" / run_id)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"({error})"


def simulation_diagnostics(done: subprocess.CompletedProcess, flower_log: Path) -> str:
    """What a failed simulation leaves to read: the CLI's stderr, Flower's log and
    Ray's own logs (named in the error), so that a failure on a CI machine can be
    understood from its output alone."""
    parts = [done.stderr[-3000:], f"--- {flower_log} (tail)", _tail(flower_log, 60)]
    ray_logs = done.stderr.rsplit("Ray's logs: ", 1)[1].split(")", 1)[0].strip() if "Ray's logs: " in done.stderr else ""
    if ray_logs and Path(ray_logs).is_dir():
        raylet = [line for line in _tail(Path(ray_logs) / "raylet.out", 2000).splitlines() if " W " in line or " E " in line]
        parts += ["--- raylet warnings and errors", "\n".join(raylet[-40:])]
        for err in sorted(Path(ray_logs).glob("*.err")):
            text = _tail(err, 15)
            if text.strip():
                parts += [f"--- {err.name}", text]
    return "\n".join(parts)[-20000:]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A workspace with the partition and the local (reference) runs of both methods."""
    workspace = tmp_path_factory.mktemp("flower-cli") / "ws"
    for args in (
        PARTITION,
        (*TRAIN, *METHOD_FLAGS["pfedmoap"], "--run-id", "local-pfedmoap"),
        (*TRAIN, *METHOD_FLAGS["promptfl"], "--run-id", "local-promptfl"),
    ):
        result = in_process(workspace, *args)
        assert result.exit_code == 0, result.stderr
    return workspace


# ---- 1. Flower's simulation runtime -----------------------------------------------------------------
@pytest.mark.ray
def test_flower_simulation_writes_the_local_engines_run_files(workspace):
    # A reply Ray loses under heavy load costs one --round-timeout before the step is sent again.
    done = script(workspace, *TRAIN, *METHOD_FLAGS["pfedmoap"], "--engine", "flower", "--round-timeout", "60", "--run-id", "flower-pfedmoap")
    sys.stderr.write(done.stderr)  # shown by pytest when a comparison below fails
    assert done.returncode == 0, simulation_diagnostics(done, run_paths(workspace, "flower-pfedmoap").flower_log)
    assert "run flower-pfedmoap: 2/2 rounds complete" in done.stdout, done.stdout
    assert "Traceback" not in done.stderr
    assert_same_run_files(run_paths(workspace, "flower-pfedmoap"), run_paths(workspace, "local-pfedmoap"), rounds=2)
    record = json.loads(run_paths(workspace, "flower-pfedmoap").run_json.read_text())
    assert record["settings"] == json.loads(run_paths(workspace, "local-pfedmoap").run_json.read_text())["settings"]


@pytest.mark.ray
def test_a_local_run_resumes_on_flower(workspace):
    """Started locally and stopped after round 0, then ``--resume --engine flower`` with the same flags: the same run id."""
    flags = (*TRAIN, *METHOD_FLAGS["promptfl"])
    started = in_process(workspace, *flags, "--stop-after", "1")
    assert started.exit_code == 0 and "1/2 rounds complete" in started.stdout, started.stderr
    run_id = started.stdout.split("run ", 1)[1].split(":", 1)[0]
    assert run_id != "local-promptfl" and run_paths(workspace, run_id).run_json.is_file()
    runs_before = sorted(p.name for p in (workspace / "runs").iterdir())

    done = script(workspace, *flags, "--resume", "--engine", "flower", "--round-timeout", "60")
    sys.stderr.write(done.stderr)  # shown by pytest when a comparison below fails
    assert done.returncode == 0, simulation_diagnostics(done, run_paths(workspace, run_id).flower_log)
    assert f"run {run_id}: 2/2 rounds complete" in done.stdout, done.stdout
    assert sorted(p.name for p in (workspace / "runs").iterdir()) == runs_before  # no new run: the engine is not in the id
    assert_same_run_files(run_paths(workspace, run_id), run_paths(workspace, "local-promptfl"), rounds=2)
    # a finished run is not trained again, whichever engine is asked
    again = in_process(workspace, *flags, "--resume", "--engine", "flower")
    assert again.exit_code == 0 and "already complete" in again.stdout, again.stderr


# ---- 2. usage errors ------------------------------------------------------------------------------
def test_an_unknown_engine_is_a_usage_error(tmp_path):
    done = script(tmp_path / "ws", "train", "--engine", "nosuch", timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("Usage: pfedmoap train "), done.stderr
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert "--engine" in error and "nosuch" in error and "local" in error and "flower" in error, error
    assert "Traceback" not in done.stderr


def test_round_timeout_needs_the_flower_engine(cli, workspace):
    runs_before = sorted(p.name for p in (workspace / "runs").iterdir())
    message = one_line_error(cli(*TRAIN, "--method", "promptfl", "--round-timeout", "5", workspace=workspace))
    assert "--round-timeout" in message and "--engine flower" in message, message
    message = one_line_error(cli(*TRAIN, "--method", "promptfl", "--engine", "flower", "--round-timeout", "0", workspace=workspace))
    assert "--round-timeout" in message and "positive" in message, message
    assert sorted(p.name for p in (workspace / "runs").iterdir()) == runs_before  # refused before any run starts


def test_flower_only_flags_without_flower_are_refused_before_the_workspace_is_read(cli, tmp_path):
    """The flag combination is wrong whatever the workspace holds (here: no partition yet)."""
    message = one_line_error(cli("train", "--round-timeout", "5", workspace=tmp_path / "empty"))
    assert "--round-timeout" in message and "--engine flower" in message, message
    message = one_line_error(cli("train", "--write-flower-app", str(tmp_path / "app"), workspace=tmp_path / "empty"))
    assert "--write-flower-app" in message and "--engine flower" in message, message


def test_write_flower_app_needs_the_flower_engine(cli, workspace, tmp_path):
    message = one_line_error(cli(*TRAIN, "--method", "promptfl", "--write-flower-app", str(tmp_path / "app"), workspace=workspace))
    assert "--write-flower-app" in message and "--engine flower" in message, message
    assert not (tmp_path / "app").exists()


# ---- 3. the app a deployment runs -------------------------------------------------------------------
def test_write_flower_app_holds_the_resolved_settings(cli, workspace, tmp_path):
    app_dir = tmp_path / "app"
    runs_before = sorted(p.name for p in (workspace / "runs").iterdir())
    result = cli(*TRAIN, *METHOD_FLAGS["pfedmoap"], "--engine", "flower", "--round-timeout", "120",
                 "--write-flower-app", str(app_dir), workspace=workspace)
    assert result.exit_code == 0, result.stderr
    assert str(app_dir / "pyproject.toml") in result.stdout and "flwr run" in result.stdout
    assert sorted(p.name for p in (workspace / "runs").iterdir()) == runs_before  # it writes the app, it trains nothing

    document = tomllib.loads((app_dir / "pyproject.toml").read_text())
    app = document["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "pfedmoap_cli.flower.server_app:app",
        "clientapp": "pfedmoap_cli.flower.client_app:app",
    }
    config = app["config"]
    # the settings the same flags resolve to when training (run.json of the local run)
    trained = json.loads(run_paths(workspace, "local-pfedmoap").run_json.read_text())
    assert json.loads(config["settings"]) == trained["settings"]
    from pfedmoap_cli.engine.run_record import partition_path_of

    assert Path(config["partition"]).resolve() == partition_path_of(trained, workspace).resolve() and Path(config["partition"]).is_file()
    assert Path(config["workspace"]) == workspace.resolve()
    assert config["run-id"] == "" and config["round-timeout"] == 120.0
    # and the ServerApp reads that config back into the same settings
    from pfedmoap_cli.engine.settings import settings_from_json
    from pfedmoap_cli.flower.server_app import DeploymentConfig

    deployed = DeploymentConfig.from_run_config(config)
    assert settings_from_json(json.loads(deployed.settings_json)).to_json() == trained["settings"]
    assert deployed.options.round_timeout == 120.0
    assert metric_rows(run_paths(workspace, "local-pfedmoap"))  # the reference run is a real one


def test_the_simulation_starts_a_ray_instance_of_its_own(workspace, monkeypatch):
    """Ray is asked for a new local instance (``address="local"``), never the cluster that
    RAY_ADDRESS or a ``ray start`` on the machine names, and Ray's failure is one line."""
    import flwr.simulation

    asked: list[dict] = []

    def fake_run_simulation(**kwargs):
        asked.append(kwargs["backend_config"])
        raise RuntimeError("no Ray here")

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a foreign cluster a user's shell may name
    result = in_process(workspace, *TRAIN, *METHOD_FLAGS["promptfl"], "--engine", "flower", "--run-id", "ray-args")
    assert result.exit_code == 1, result.stderr
    assert len(asked) == 1 and asked[0]["init_args"]["address"] == "local"
    assert asked[0]["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: Flower's simulation runtime failed (no Ray here)"), lines


def test_a_servers_error_names_flowers_and_rays_logs():
    from pfedmoap_cli.errors import FederationError
    from pfedmoap_cli.flower.simulation import ray_logs_folder, with_log_hint

    assert ray_logs_folder() is None  # no Ray instance in this process
    hinted = with_log_hint(FederationError("round 0: train failed"), Path("/w/flower.log"), "/tmp/ray/s/logs")
    assert isinstance(hinted, FederationError)
    assert str(hinted) == "round 0: train failed (Flower's log: /w/flower.log; Ray's logs: /tmp/ray/s/logs)"
    assert str(with_log_hint(FederationError("x"), Path("/w/flower.log"))) == "x (Flower's log: /w/flower.log)"
    other = ValueError("not the server's")
    assert with_log_hint(other, Path("/w/flower.log"), "/r") is other
