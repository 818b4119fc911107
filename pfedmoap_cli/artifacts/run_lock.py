"""One process per run: an exclusive lock file per run id.

Two processes that train the same run at once (two ``pfedmoap sweep``
commands over overlapping cells, a ``train --resume`` while a sweep runs it,
workers on several machines sharing one workspace) would interleave
checkpoints and metrics rows. A run is therefore trained only while its lock
``locks/<run-id>.lock`` is held. The file is created with ``O_EXCL``, which
is atomic on local file systems and on NFSv3+, and holds who took it (host,
pid, time).

A lock left by a process that died is *stale*. On the host that took it,
that is checked (the pid no longer exists) and the lock is taken over. A lock
from another host cannot be checked from here; it stays until that process
releases it or a user deletes the file (the error says which).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from pathlib import Path
from types import TracebackType

from pfedmoap_cli.errors import ArtifactError


class RunInUse(ArtifactError):
    """The run's lock is held by another live process (or one on another host)."""

    def __init__(self, run_id: str, lock_path: Path, holder: dict) -> None:
        self.run_id = run_id
        self.lock_path = lock_path
        self.holder = holder
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
        super().__init__(
            f"run {run_id} is being trained by {who}; wait for it to finish, or delete {lock_path} if that process is gone"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # being written, or unreadable: treat as held by an unknown process
    return data if isinstance(data, dict) else {}


class RunLock:
    """Context manager holding the lock of one run id under ``locks_dir``.

    Raises
    ------
    RunInUse
        On entry, when another live process (or a process on another host)
        holds the lock.
    """

    def __init__(self, locks_dir: Path, run_id: str) -> None:
        self.run_id = run_id
        self.path = Path(locks_dir) / f"{run_id}.lock"
        self._held = False

    def _try_create(self) -> bool:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(holder) + "\n")
        return True

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._try_create():
            self._held = True
            return self
        holder = _read_holder(self.path)
        if self._is_stale(holder) and self._take_over(holder):
            self._held = True
            return self
        raise RunInUse(self.run_id, self.path, _read_holder(self.path) or holder)

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        pid = holder.get("pid")
        return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)

    def _take_over(self, stale_holder: dict) -> bool:
        """Replace a stale lock, guarded so that two processes cannot both take it over."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False  # another process is taking it over right now
        os.close(fd)
        try:
            if _read_holder(self.path) != stale_holder:  # taken over and re-locked meanwhile
                return False
            self.path.unlink(missing_ok=True)
            return self._try_create()
        finally:
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        if self._held:
            self._held = False
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.release()
