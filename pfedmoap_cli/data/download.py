"""Fetch, verify and unpack a dataset's :class:`Resource` files under the data root.

``download_dataset`` is safe to repeat: a resource whose ``creates`` path is
already there is skipped (a plain file is re-verified against its checksum
first; an unpacked archive was verified when it was fetched). An archive
already downloaded and matching its checksum is unpacked without fetching it
again. Downloads go to ``<file>.part`` and are renamed only once the checksum
matches; archives are unpacked into a temporary folder and then moved into
place, so an interrupted run never leaves a half-unpacked folder that looks
complete. Network failures fail fast (``TIMEOUT_S`` per connect/read) with a
one-line :class:`DataError`; files that cannot be fetched automatically
(Google Drive) are listed with where to get them and where to put them.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pfedmoap_cli import __version__
from pfedmoap_cli.data.resources import Resource, file_digest, split_checksum, verify_file
from pfedmoap_cli.data.sources.base import DatasetSource
from pfedmoap_cli.errors import DataError

TIMEOUT_S = 10.0  # per socket operation (connect, each read): offline fails in seconds, never hangs
CHUNK = 1 << 20

Echo = Callable[[str], None]


@dataclass(frozen=True)
class DatasetStatus:
    """Which of a dataset's resources are in place under a data root."""

    state: str  # "present", "incomplete" or "missing"
    missing: tuple[str, ...]


def resources_of(cls: type[DatasetSource]) -> tuple[Resource, ...]:
    """The dataset's resources (empty for sources with nothing to download)."""
    return tuple(getattr(cls, "resources", ()))


def dataset_status(cls: type[DatasetSource], root: Path) -> DatasetStatus:
    """``present`` when every resource's ``creates`` path exists, ``missing`` when none does."""
    wanted = resources_of(cls)
    missing = tuple(r.creates for r in wanted if not (Path(root) / r.creates).exists())
    state = "missing" if len(missing) == len(wanted) else "incomplete" if missing else "present"
    return DatasetStatus(state, missing)


# ----------------------------------------------------------------------------- fetching


def fetch(
    url: str, dest: Path, checksum: str | None, *, progress: bool = True, timeout: float = TIMEOUT_S,
    rerun: str = "pfedmoap download",
) -> str:
    """Download ``url`` to ``dest`` (via ``dest.part``), verifying ``checksum``.

    Returns
    -------
    str
        The sha256 of what was fetched (printed for files without a known checksum).

    Raises
    ------
    DataError
        Network failure (one line, naming the manual fix and the command to
        ``rerun``) or checksum mismatch (the partial file is removed).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    algorithm, expected = split_checksum(checksum) if checksum else ("sha256", None)
    hasher, sha256 = hashlib.new(algorithm), hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": f"pfedmoap/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress, leave=False) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    hasher.update(chunk)
                    sha256.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, ConnectionError, OSError) as error:
        part.unlink(missing_ok=True)
        if isinstance(error, urllib.error.HTTPError):
            reason = f"HTTP {error.code} {error.reason}"
        else:
            reason = getattr(error, "reason", None) or error
        raise DataError(
            f"cannot fetch {url} ({reason}); check the network connection, "
            f"or download it by hand to {dest} and rerun '{rerun}'"
        ) from None
    if expected is not None and hasher.hexdigest() != expected:
        part.unlink(missing_ok=True)
        raise DataError(
            f"checksum mismatch for {url} ({algorithm} {hasher.hexdigest()}, expected {expected}); "
            f"the download is corrupt or changed upstream: retry, or fetch it by hand to {dest}"
        )
    os.replace(part, dest)
    return sha256.hexdigest()


# ----------------------------------------------------------------------------- unpacking


def _safe_member(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return not path.is_absolute() and ".." not in path.parts


def _unpack(archive: Path, into: Path) -> None:
    """Unpack a .zip / .tar / .tar.gz / .tgz archive into ``into``, refusing unsafe paths."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                bad = [n for n in zf.namelist() if not _safe_member(n)]
                if bad:
                    raise DataError(f"{archive} holds unsafe path {bad[0]!r}; delete it and download it again")
                zf.extractall(into)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                bad = [m.name for m in members if not _safe_member(m.name) or m.issym() or m.islnk()]
                if bad:
                    raise DataError(f"{archive} holds unsafe entry {bad[0]!r}; delete it and download it again")
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(into, members=members, filter="data")
                else:  # pragma: no cover -- Python without extraction filters; members were checked above
                    tf.extractall(into, members=members)
        else:
            raise DataError(f"{archive} is not a zip or tar archive; delete it and download it again")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as error:
        raise DataError(f"cannot unpack {archive} ({error}); delete it and download it again") from None


def _merge(src: Path, dst: Path) -> None:
    """Move ``src``'s content into ``dst``; files already in ``dst`` are kept (never overwritten)."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        target = dst / entry.name
        if not target.exists():
            os.replace(entry, target)
        elif entry.is_dir() and target.is_dir():
            _merge(entry, target)


def extract(archive: Path, into: Path, inner: str | None = None) -> None:
    """Unpack ``archive`` (or the archive ``inner`` inside it) into ``into`` via a temporary folder."""
    into = Path(into)
    scratch = into / f".pfedmoap-unpack-{archive.name}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        _unpack(archive, scratch / "outer")
        if inner is None:
            _merge(scratch / "outer", into)
        else:
            nested = scratch / "outer" / inner
            if not nested.is_file():
                raise DataError(f"{archive} does not contain {inner}; delete it and download it again")
            _unpack(nested, scratch / "inner")
            _merge(scratch / "inner", into)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ----------------------------------------------------------------------------- one dataset


def manual_instructions(resource: Resource, root: Path) -> str:
    """What to download by hand and where to put it."""
    target = Path(root) / resource.file
    unpack_into = Path(root) / (resource.extract_to or ".")
    then = f"; rerun this command to unpack it into {unpack_into}" if resource.extract_to else ""
    return f"  - download {resource.url}\n    and save it as {target}{then}"


def download_dataset(cls: type[DatasetSource], root: Path, *, progress: bool = True, echo: Echo = print) -> None:
    """Fetch, verify and unpack every resource of dataset ``cls`` under ``root``.

    Files that must be fetched by hand are listed first (so they can be got
    while the rest downloads); the command fails at the end while any is missing.

    Raises
    ------
    DataError
        A fetch, checksum or unpack failure; or files that must be fetched by
        hand are still missing.
    """
    root = Path(root)
    name = cls.name
    rerun = f"pfedmoap download --dataset {name}"
    pending = [
        r for r in resources_of(cls)
        if r.manual and not (root / r.creates).exists() and not (root / r.file).is_file()
    ]
    if pending:
        echo(f"{name}: {len(pending)} file(s) cannot be fetched automatically; get them by hand:")
        for resource in pending:
            echo(manual_instructions(resource, root))
    for resource in resources_of(cls):
        if resource in pending:
            continue
        target = root / resource.creates
        saved = root / resource.file
        if target.exists():
            if resource.extract_to is None and resource.checksum and not verify_file(target, resource.checksum):
                echo(f"{resource.creates}: checksum mismatch, fetching it again")
            else:
                echo(f"{resource.creates}: present, skipped")
                continue
        if saved.is_file() and (resource.manual or verify_file(saved, resource.checksum)):
            echo(f"{resource.file}: already downloaded")
        else:
            echo(f"{resource.file}: fetching {resource.url}")
            sha = fetch(resource.url, saved, resource.checksum, progress=progress, rerun=rerun)
            if resource.checksum is None:
                echo(f"  warning: no published checksum for {resource.file}; not verified (sha256 {sha})")
        if resource.extract_to is not None:
            echo(f"{resource.file}: unpacking into {root / resource.extract_to}")
            extract(saved, root / resource.extract_to, resource.inner)
        if not target.exists():
            raise DataError(f"{saved} did not provide {target}; delete {saved} and download it again")
    _verify_content(cls, root)
    if pending:
        raise DataError(
            f"{name} is incomplete: download the {len(pending)} file(s) listed above, put them where shown, "
            f"and rerun '{rerun}'"
        )
    echo(f"{name}: ready under {root}")


def _verify_content(cls: type[DatasetSource], root: Path) -> None:
    """Check unpacked files that have their own published checksums (CIFAR's batches)."""
    folder = getattr(cls, "folder", None)
    for file, md5 in getattr(cls, "content_md5", {}).items():
        path = Path(root) / folder / file
        if not path.is_file() or file_digest(path, "md5") != md5:
            raise DataError(
                f"{path} is missing or corrupt (md5 mismatch); delete {Path(root) / folder} "
                f"and rerun 'pfedmoap download --dataset {cls.name}'"
            )
