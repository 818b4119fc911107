"""One process per run: the run lock, ``train`` refusing a run in use, and sweeps sharing a workspace."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import one_line_error
from pfedmoap_cli.artifacts.run_lock import RunInUse, RunLock


def _write_lock(path, pid: int, host: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_lock_is_exclusive_and_released(tmp_path):
    with RunLock(tmp_path, "run-a") as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunInUse, match=r"run run-a is being trained by pid \d+ on .*delete .*run-a\.lock"):
            RunLock(tmp_path, "run-a").acquire()
        with RunLock(tmp_path, "run-b"):  # other runs are independent
            pass
    assert not (tmp_path / "run-a.lock").exists()
    with RunLock(tmp_path, "run-a"):  # free again
        pass


def test_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(ValueError):
        with RunLock(tmp_path, "run-a"):
            raise ValueError("training failed")
    assert not (tmp_path / "run-a.lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    _write_lock(tmp_path / "run-a.lock", _dead_pid())
    with RunLock(tmp_path, "run-a") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".run-a.lock.takeover").exists() and not list(tmp_path.glob("*.takeover"))


def test_lock_from_another_host_is_never_taken_over(tmp_path):
    _write_lock(tmp_path / "run-a.lock", _dead_pid(), host="some-other-machine")
    with pytest.raises(RunInUse, match="on some-other-machine"):
        RunLock(tmp_path, "run-a").acquire()
    assert (tmp_path / "run-a.lock").exists()


TRAIN = ("--method", "promptfl", "--rounds", "2", "--local-epochs", "1", "--backbone", "tiny-vit", "--pretrained", "none",
         "--batch-size", "8", "--n-ctx", "2")


def test_train_refuses_a_run_another_process_is_training(cli, tmp_path):
    assert cli("partition", "--dataset", "synthetic", "--clients", "2", "--iid", "--option", "train_per_class=1",
               "--option", "test_per_class=1").exit_code == 0
    assert cli("train", *TRAIN, "--stop-after", "1").exit_code == 0  # an interrupted run: 1 of 2 rounds
    (run_dir,) = (tmp_path / "ws" / "runs").iterdir()
    metrics = (run_dir / "metrics.csv").read_bytes()
    _write_lock(tmp_path / "ws" / "locks" / f"{run_dir.name}.lock", os.getppid())  # held by a live process
    message = one_line_error(cli("train", *TRAIN, "--resume"))
    assert f"run {run_dir.name} is being trained by pid {os.getppid()}" in message and "delete" in message
    assert (run_dir / "metrics.csv").read_bytes() == metrics  # nothing touched
    (tmp_path / "ws" / "locks" / f"{run_dir.name}.lock").unlink()
    assert cli("train", *TRAIN, "--resume").exit_code == 0
    assert not (tmp_path / "ws" / "locks").exists()  # released after the run, and the emptied folder removed
