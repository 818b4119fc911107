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

Two more kinds of leftovers are recovered as safely:

* A lock file that is empty or not a holder record (a full disk stopped its
  write, or its process was killed between creating and writing it). Creating
  and writing the file take microseconds, so an unreadable lock whose last
  change is older than :data:`GRACE_S` is not being written by anyone: it is
  stale. A younger one may be a live process's lock between ``O_EXCL`` and its
  write, so it is left alone (the error says to try again shortly). Its age is
  measured against the mtime of the takeover guard just created beside it, so
  both times come from the same file server's clock. A writer that was
  nevertheless overtaken (stalled for longer than that between creating and
  writing) notices: after writing it checks that the lock file is still the one
  it created, and backs off if not.
* A ``.takeover`` guard left by a process that died during a takeover. It is
  removed when its holder is a dead pid on this host, or when it cannot be
  checked (unreadable, or another host's) and is older than :data:`GRACE_S`: a
  takeover holds its guard for milliseconds.

The one race left: two processes removing the same abandoned guard at the
same instant can both enter a takeover; under the guard the lock is re-read
and must still be the very file judged stale (same inode, size, mtime, holder),
and each new holder checks its file after writing, so both would also have to
interleave within microseconds.

The ``locks`` folder is removed when the last lock in it is released, so a
command that failed (bad settings, a run that already exists) leaves nothing
behind; a process that finds the folder gone while creating its lock makes it
again.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from pfedmoap_cli.artifacts.atomic import storage_error
from pfedmoap_cli.errors import ArtifactError

#: Seconds after which a lock or guard file that holds no readable holder record is
#: known not to be in the middle of being written (that takes microseconds).
GRACE_S = 10.0


class RunInUse(ArtifactError):
    """The run's lock is held by another live process (or one on another host)."""

    def __init__(self, run_id: str, lock_path: Path, holder: dict) -> None:
        self.run_id = run_id
        self.lock_path = lock_path
        self.holder = holder
        if holder:
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
            message = f"run {run_id} is being trained by {who}; wait for it to finish, or delete {lock_path} if that process is gone"
        else:
            message = (
                f"run {run_id} is locked by {lock_path}, which another process is writing just now; "
                f"try again in {GRACE_S:.0f} seconds (an unreadable lock older than that is recovered)"
            )
        super().__init__(message)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _inspect(path: Path) -> tuple[dict | None, os.stat_result | None]:
    """``(holder, stat)`` of a lock or guard file.

    ``holder`` is None when the file holds no holder record (empty, garbage,
    unreadable); ``stat`` is None when the file is gone.
    """
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None, None
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):
        return None, stat
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int) or not isinstance(data.get("host"), str):
        return None, stat
    return data, stat


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns)


def _dead_here(holder: dict | None) -> bool:
    """Whether ``holder`` is a process of this host that no longer exists."""
    return holder is not None and holder.get("host") == socket.gethostname() and not _pid_alive(holder["pid"])


class RunLock:
    """Context manager holding the lock of one run id under ``locks_dir``.

    Raises
    ------
    RunInUse
        On entry, when another live process (or a process on another host)
        holds the lock.
    StorageError
        On entry, when the lock cannot be written (read-only or full workspace).
    """

    def __init__(self, locks_dir: Path, run_id: str) -> None:
        self.run_id = run_id
        self.path = Path(locks_dir) / f"{run_id}.lock"
        # (st_dev, st_ino) and holder record of the lock file this process wrote. Both are
        # compared: a file system may give a new file the inode number of one just deleted.
        self._held: tuple[tuple[int, int], dict] | None = None

    @property
    def _guard(self) -> Path:
        return self.path.with_name(self.path.name + ".takeover")

    def _create(self, path: Path) -> tuple[os.stat_result, dict] | None:
        """Create ``path`` exclusively with this process's holder record; (its stat, the record), or None if it exists.

        The folder is (re)made when missing: a release elsewhere may just have removed it.
        """
        for _ in range(5):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides who may read it
            except FileExistsError:
                return None
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                continue
            break
        else:
            raise FileNotFoundError(2, "the locks folder keeps disappearing", str(path.parent))
        created: os.stat_result | None = None
        try:
            created = os.fstat(fd)
            record = _holder_record()
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                mine = os.fstat(handle.fileno())
        except BaseException:
            # Typically a full disk: an empty lock left behind would block the run (until GRACE_S).
            try:
                now = os.stat(path)
                if created is not None and (now.st_dev, now.st_ino) == (created.st_dev, created.st_ino):
                    os.unlink(path)
            except OSError:
                pass
            raise
        return mine, record

    def _try_create(self) -> bool:
        created = self._create(self.path)
        if created is None:
            return False
        mine, record = created
        self._held = ((mine.st_dev, mine.st_ino), record)
        if not self._still_mine():
            self._held = None
            return False  # overtaken between creating and writing (see the module docstring)
        return True

    def _still_mine(self) -> bool:
        """Whether the lock file is still the one this process wrote."""
        if self._held is None:
            return False
        identity, record = self._held
        holder, now = _inspect(self.path)
        return now is not None and (now.st_dev, now.st_ino) == identity and holder == record

    def acquire(self) -> "RunLock":
        try:
            return self._acquire()
        except OSError as error:
            raise storage_error(error, error.filename or self.path) from error

    def _acquire(self) -> "RunLock":
        holder: dict | None = None
        for _ in range(3):
            if self._try_create():
                return self
            holder, stat = _inspect(self.path)
            if stat is None:
                continue  # released meanwhile: try again
            stale = holder is None or _dead_here(holder)  # an unreadable one: by its age, under the guard
            if stale and self._take_over(holder, stat):
                return self
            break
        raise RunInUse(self.run_id, self.path, _inspect(self.path)[0] or holder or {})

    def _claim_guard(self) -> os.stat_result | None:
        """Create the takeover guard, removing an abandoned one first; its stat, or None if another holds it."""
        guard = self._guard
        for _ in range(3):
            created = self._create(guard)
            if created is not None:
                return created[0]
            holder, stat = _inspect(guard)
            if stat is None:
                continue
            abandoned = _dead_here(holder) or (
                (holder is None or holder.get("host") != socket.gethostname()) and time.time() - stat.st_mtime > GRACE_S
            )
            if not abandoned:
                return None  # another process is taking it over right now
            _, again = _inspect(guard)
            if again is not None and _same_file(again, stat):
                guard.unlink(missing_ok=True)
        return None

    def _take_over(self, stale_holder: dict | None, stale_stat: os.stat_result) -> bool:
        """Replace a stale lock, guarded so that two processes cannot both take it over."""
        guard = self._claim_guard()
        if guard is None:
            return False
        try:
            holder, stat = _inspect(self.path)
            if stat is None or holder != stale_holder or not _same_file(stat, stale_stat):
                return False  # released, taken over and re-locked, or written meanwhile
            if holder is None and guard.st_mtime - stat.st_mtime < GRACE_S:
                return False  # unreadable but young: may be a live lock between create and write
            self.path.unlink(missing_ok=True)
            return self._try_create()
        finally:
            self._guard.unlink(missing_ok=True)

    def release(self) -> None:
        if self._held is None:
            return
        if self._still_mine():  # never delete a lock another process has since taken
            self.path.unlink(missing_ok=True)
        self._held = None
        try:
            self.path.parent.rmdir()  # only when empty: a failed command leaves no empty locks/ behind
        except OSError:
            pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.release()
