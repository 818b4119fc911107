"""Atomic file writes, content hashing, and the storage errors of writes.

A write goes to a temporary file in the target's directory and is renamed over
the target, so a reader (or a resumed run) never sees a half-written file.

Every artifact of a workspace is written here, so this is also where the
storage's refusals (disk full, read-only file system, a file where a folder
belongs, no permission) become one :class:`~pfedmoap_cli.errors.StorageError`
naming the path and the fix, instead of an ``OSError`` (or safetensors'
``SafetensorError``, which carries the OS error only in its text).
"""

from __future__ import annotations

import errno as _errno
import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, Callable

from pfedmoap_cli.errors import StorageError

_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")


def os_error_of(error: BaseException) -> OSError | None:
    """The OS error behind ``error``: ``error`` itself, or the one a ``SafetensorError`` names in its text.

    safetensors (Rust) reports a failed write as ``SafetensorError('Error while
    serializing: I/O error: No space left on device (os error 28)')``: a plain
    ``Exception`` whose only trace of the cause is that text.
    """
    if isinstance(error, OSError):
        return error
    if type(error).__name__ == "SafetensorError":
        match = _OS_ERROR_IN_TEXT.search(str(error))
        if match:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
    return None


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _mount_point(path: Path) -> Path:
    """The mount point of the file system ``path`` (or its nearest existing folder) is on."""
    current = _absolute(path)
    while not os.path.lexists(current) and current != current.parent:
        current = current.parent
    while not os.path.ismount(current) and current != current.parent:
        current = current.parent
    return current


def _file_in_the_way(path: Path) -> Path | None:
    """The first of ``path``'s folders (from the root down) that exists but is not a folder."""
    absolute = _absolute(path)
    for candidate in [*reversed(absolute.parents), absolute][1:]:
        if not os.path.lexists(candidate):
            return None
        if not candidate.is_dir():
            return candidate if candidate != absolute else None
    return None


def _nearest_folder(path: Path) -> Path:
    current = _absolute(path).parent
    while not current.is_dir() and current != current.parent:
        current = current.parent
    return current


def storage_error(error: OSError, path: Path | str | None = None, action: str = "writing") -> StorageError:
    """A one-line :class:`StorageError` for ``error`` (raised while ``action`` ``path``), naming the fix.

    ``path`` defaults to the error's own file name. Messages that end in
    :attr:`StorageError.RERUN` are those after which repeating the command is the fix.
    """
    raw = path if path is not None else error.filename
    target = _absolute(Path(os.fsdecode(raw))) if raw not in (None, "") else None
    code = error.errno
    at = f" {action} {target}" if target is not None else ""
    reason = error.strerror or str(error)
    if code == _errno.ENOSPC:
        message = f"no space left on the device{at}; free space and {StorageError.RERUN}"
    elif code == getattr(_errno, "EDQUOT", -1):
        message = f"disk quota exceeded{at}; free space and {StorageError.RERUN}"
    elif code == _errno.EROFS and target is not None:
        message = f"{_mount_point(target)} is read-only (can't write {target}); pass a writable --workspace"
    elif code in (_errno.ENOTDIR, _errno.EEXIST) and target is not None and _file_in_the_way(target) is not None:
        blocker = _file_in_the_way(target)
        message = f"{blocker} is a file, not a folder (can't write {target}); move it away or pass another --workspace"
    elif code in (_errno.EACCES, _errno.EPERM) and target is not None:
        message = f"permission denied{at}; make {_nearest_folder(target)} writable for this user or pass another --workspace"
    elif code == _errno.EISDIR and target is not None:
        message = f"{target} is a folder where a file belongs; move it away and {StorageError.RERUN}"
    else:
        message = f"{reason}{at} (os error {code}); fix the storage and {StorageError.RERUN}"
    return StorageError(message, target, code)


def _create_temp(directory: Path, name: str) -> Path:
    """Create an empty, unique temporary file beside the target.

    Created with mode 0o666 like any ``open(..., "w")``, so the umask (and a
    default ACL) decide who may read it; ``tempfile.mkstemp`` would make every
    artifact 0600, unreadable to the others sharing a workspace.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(_errno.EEXIST, "no unused temporary file name", str(directory))


def atomic_write(path: Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``.

    Parameters
    ----------
    path:
        Final location; parent directories are created.
    writer:
        Function that writes the complete file at the temporary path it is given.

    Raises
    ------
    StorageError
        The storage refused the write (full, read-only, ...); ``path`` is
        unchanged and no temporary file is left.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temp(path.parent, path.name)
        writer(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except Exception as error:  # noqa: BLE001 -- only storage failures are translated
        cause = os_error_of(error)
        if cause is None:
            raise
        raise storage_error(cause, path) from error
    finally:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 ``text`` to ``path``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the form hashes are taken of."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of the canonical JSON form of ``obj``."""
    return sha256_bytes(canonical_json(obj).encode("utf-8"))


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
