"""Run locks left in a bad state are recovered as safely as a dead process's lock, and no empty folder is left."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import one_line_error
from pfedmoap_cli.artifacts import run_lock
from pfedmoap_cli.artifacts.run_lock import GRACE_S, RunInUse, RunLock


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _holder(pid: int, host: str | None = None) -> str:
    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"})


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.parametrize("content", ["", "{\"pid\": 12", "\0\0\0\0", "[]", "{\"host\": \"h\"}"])
def test_old_unreadable_lock_is_taken_over(tmp_path, content):
    path = tmp_path / "run-a.lock"
    path.write_text(content)
    _age(path, GRACE_S + 5)
    with RunLock(tmp_path, "run-a") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not list(tmp_path.glob("run-a.lock*"))


def test_young_unreadable_lock_may_be_being_written_and_is_left_alone(tmp_path):
    # A live process between creating its lock (O_EXCL) and writing it looks exactly like this.
    path = tmp_path / "run-a.lock"
    path.write_text("")
    with pytest.raises(RunInUse, match=r"another process is writing just now; try again in \d+ seconds"):
        RunLock(tmp_path, "run-a").acquire()
    assert path.read_text() == "" and not list(tmp_path.glob("*.takeover"))


@pytest.mark.parametrize("guard", ["dead-pid", "empty-old", "other-host-old"])
def test_stale_lock_beside_an_abandoned_takeover_guard_is_taken_over(tmp_path, guard):
    (tmp_path / "run-a.lock").write_text(_holder(_dead_pid()))
    guard_path = tmp_path / "run-a.lock.takeover"
    guard_path.write_text({"dead-pid": _holder(_dead_pid()), "empty-old": "", "other-host-old": _holder(1, "elsewhere")}[guard])
    if guard != "dead-pid":
        _age(guard_path, GRACE_S + 5)
    with RunLock(tmp_path, "run-a") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert not guard_path.exists()


@pytest.mark.parametrize("guard", ["live-pid", "empty-young"])
def test_a_takeover_in_progress_is_respected(tmp_path, guard):
    (tmp_path / "run-a.lock").write_text(_holder(_dead_pid()))
    guard_path = tmp_path / "run-a.lock.takeover"
    guard_path.write_text({"live-pid": _holder(os.getppid()), "empty-young": ""}[guard])
    with pytest.raises(RunInUse):
        RunLock(tmp_path, "run-a").acquire()
    assert guard_path.exists() and json.loads((tmp_path / "run-a.lock").read_text())["pid"] != os.getpid()


def test_release_never_deletes_a_lock_another_process_has_taken(tmp_path):
    lock = RunLock(tmp_path, "run-a").acquire()
    lock.path.unlink()
    lock.path.write_text(_holder(os.getppid()))  # someone else's lock now
    lock.release()
    assert json.loads(lock.path.read_text())["pid"] == os.getppid()


def test_a_lock_overtaken_before_its_holder_was_written_backs_off(tmp_path, monkeypatch):
    """The writer stalled past GRACE_S and its empty file was taken over: it must not also believe it holds the lock."""
    real_record = run_lock._holder_record
    lock_path = tmp_path / "run-a.lock"

    def stalled_then_overtaken():
        if lock_path.exists() and not lock_path.read_text():
            lock_path.unlink()  # what a takeover by another process does ...
            lock_path.write_text(_holder(os.getppid()))  # ... and its new lock
        return real_record()

    monkeypatch.setattr(run_lock, "_holder_record", stalled_then_overtaken)
    with pytest.raises(RunInUse, match=f"pid {os.getppid()}"):
        RunLock(tmp_path, "run-a").acquire()
    assert json.loads(lock_path.read_text())["pid"] == os.getppid()


def test_full_disk_while_writing_a_lock_leaves_no_empty_lock(tmp_path, monkeypatch):
    from pfedmoap_cli.errors import StorageError

    def full():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_lock, "_holder_record", full)
    with pytest.raises(StorageError, match="no space left on the device"):
        RunLock(tmp_path / "locks", "run-a").acquire()
    assert not (tmp_path / "locks" / "run-a.lock").exists()


def test_locks_folder_goes_with_the_last_lock(tmp_path):
    locks = tmp_path / "locks"
    with RunLock(locks, "run-a"):
        with RunLock(locks, "run-b"):
            pass
        assert locks.is_dir()  # run-a is still held
    assert not locks.exists()
    with RunLock(locks, "run-a"):  # made again when needed
        assert (locks / "run-a.lock").is_file()


def test_failed_train_command_leaves_no_locks_folder(cli, tmp_path):
    assert cli("partition", "--dataset", "synthetic", "--clients", "2", "--iid", "--option", "train_per_class=1",
               "--option", "test_per_class=1").exit_code == 0
    assert "no run" in one_line_error(cli("train", "--method", "promptfl", "--backbone", "tiny-vit", "--pretrained", "none", "--resume"))
    assert not (tmp_path / "ws" / "locks").exists()
