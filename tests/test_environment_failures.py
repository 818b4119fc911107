"""A hostile environment: a read-only or full workspace, a file where a folder belongs, Ctrl-C, the umask.

Each ends in one line and a defined exit code (2 for the environment, 130 for
Ctrl-C) with nothing half-written left behind. Read-only and full file systems
are real: a small tmpfs mounted for the test (root only; skipped elsewhere),
because running as root makes chmod-based read-only folders writable anyway.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import one_line_error
from pfedmoap_cli.artifacts.atomic import atomic_write, atomic_write_text
from pfedmoap_cli.errors import StorageError

TINY = ("--method", "promptfl", "--rounds", "2", "--local-epochs", "1", "--backbone", "tiny-vit", "--pretrained", "none",
        "--batch-size", "8", "--n-ctx", "2")
PARTITION = ("partition", "--dataset", "synthetic", "--clients", "2", "--iid", "--option", "train_per_class=1",
             "--option", "test_per_class=1")
SCRIPT = Path(sys.executable).with_name("pfedmoap")


class Mount:
    """A tmpfs at ``path``; ``read_only()`` remounts it so."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True, capture_output=True)

    def fill(self, leave_pages: int = 0) -> None:
        """Fill the file system up to ``leave_pages`` free 4 KiB pages."""
        stat = os.statvfs(self.path)
        free = stat.f_bavail * stat.f_frsize
        (self.path / "filler").write_bytes(b"\0" * max(0, free - leave_pages * 4096))


@pytest.fixture
def tmpfs(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root): {done.stderr.strip()}")
    try:
        yield Mount(path)
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)
        if os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(".tmp") or p.suffix == ".lock")


# ---- read-only, full, a file where a folder belongs ----------------------------------------------


def test_read_only_workspace_is_one_line_naming_the_fix(cli, tmpfs):
    ws = tmpfs.path / "ws"
    assert cli(*PARTITION, workspace=ws).exit_code == 0
    tmpfs.read_only()
    message = one_line_error(cli("train", *TINY, workspace=ws))
    assert message.startswith(f"error: {tmpfs.path} is read-only (can't write {ws}/")
    assert message.endswith("; pass a writable --workspace")
    message = one_line_error(cli(*PARTITION, "--seed", "2", workspace=ws))
    assert f"{tmpfs.path} is read-only" in message and "partitions" in message


def test_workspace_that_is_a_file(cli, tmp_path):
    workspace = tmp_path / "afile"
    workspace.write_text("not a folder")
    for args in (PARTITION, ("train", *TINY), ("report",)):
        message = one_line_error(cli(*args, workspace=workspace))
        assert message == f"error: --workspace {workspace} is a file, not a folder; pass a folder"
    assert workspace.read_text() == "not a folder"


def test_a_file_where_a_workspace_folder_belongs(cli, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "partitions").write_text("")
    message = one_line_error(cli(*PARTITION, workspace=ws))
    assert message.startswith(f"error: {ws / 'partitions'} is a file, not a folder (can't write {ws / 'partitions'}/")


def test_full_disk_during_training_keeps_completed_work_and_resumes(cli, tmpfs):
    ws = tmpfs.path / "ws"
    assert cli(*PARTITION, workspace=ws).exit_code == 0
    # Another run first, so the test features are cached and the failing run's first writes are its own.
    assert cli("train", *TINY, "--seed", "7", "--stop-after", "1", workspace=ws).exit_code == 0
    tmpfs.fill(leave_pages=2)  # the lock and run.json fit, the first checkpoint does not
    message = one_line_error(cli("train", *TINY, workspace=ws))
    assert message.startswith(f"error: no space left on the device writing {ws / 'runs'}/")
    assert message.endswith("; free space and run the same command with --resume")
    assert _leftovers(tmpfs.path) == [] and not (ws / "locks").exists()
    (tmpfs.path / "filler").unlink()
    result = cli("train", *TINY, "--resume", workspace=ws)
    assert result.exit_code == 0, result.stderr
    assert "2/2 rounds complete" in result.stdout


def test_full_disk_safetensors_write_is_a_storage_error_and_leaves_the_old_file(tmpfs):
    import torch
    from safetensors.torch import save_file

    target = tmpfs.path / "x.safetensors"
    atomic_write_text(target, "old")
    tmpfs.fill()
    with pytest.raises(StorageError, match=rf"^no space left on the device writing {target}; free space and run the same command again$"):
        atomic_write(target, lambda tmp: save_file({"a": torch.zeros(100_000)}, str(tmp)))
    assert target.read_text() == "old"
    assert _leftovers(tmpfs.path) == []


def test_os_errors_outside_the_write_boundary_are_one_line(cli, monkeypatch, tmp_path):
    from pfedmoap_cli import api  # the report command's code path

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ws" / "runs"))

    monkeypatch.setattr(api, "summarize_runs", denied)
    message = one_line_error(cli("report"))
    assert message.startswith(f"error: permission denied at {tmp_path / 'ws' / 'runs'}; make ") and "writable" in message

    class SafetensorError(Exception):  # what safetensors raises: the OS error only in its text
        pass

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(api, "summarize_runs", full)
    assert one_line_error(cli("report")).startswith("error: no space left on the device")


# ---- the umask -----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    from pfedmoap_cli.artifacts.run_lock import RunLock

    before = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with RunLock(tmp_path / "locks", "run") as lock:
            lock_mode = os.stat(lock.path).st_mode & 0o777
    finally:
        os.umask(before)
    assert os.stat(tmp_path / "a.txt").st_mode & 0o777 == mode
    assert lock_mode == mode


# ---- Ctrl-C --------------------------------------------------------------------------------------


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PFEDMOAP_DEBUG", None)
    return subprocess.Popen([str(SCRIPT), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _catches_sigint(pid: int) -> bool:
    """Whether the process has a SIGINT handler installed (Python's or ours): it is running Python code."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGINT - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to see when the process is up")
def test_ctrl_c_while_starting_is_one_line(tmp_path):
    process = _start(["--workspace", str(tmp_path / "ws"), *PARTITION], tmp_path)
    deadline = time.monotonic() + 30
    while not _catches_sigint(process.pid) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.2)  # inside the imports (torch alone takes seconds here)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, (out, err)
    assert err.strip().splitlines() == ["interrupted while starting; nothing was done"], err
    assert not (tmp_path / "ws").exists()


def test_ctrl_c_during_training_is_one_line_and_resumable(cli, tmp_path):
    ws = tmp_path / "ws"
    assert cli(*PARTITION, workspace=ws).exit_code == 0
    args = ["--quiet", "--workspace", str(ws), "train", *TINY[:3], "50", *TINY[4:]]
    process = _start(args, tmp_path)
    deadline = time.monotonic() + 120
    # Training has started once the run has its first (round 0) checkpoint.
    while not list((ws / "runs").glob("*/checkpoints/round-0000")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, (out, err)
    (line,) = err.strip().splitlines()
    assert line.startswith("interrupted; completed rounds are saved, continue with 'pfedmoap --quiet --workspace "), err
    assert line.endswith(" --rounds 50 --local-epochs 1 --backbone tiny-vit --pretrained none --batch-size 8 --n-ctx 2 --resume'")
    assert not (ws / "locks").exists() and _leftovers(ws) == []
