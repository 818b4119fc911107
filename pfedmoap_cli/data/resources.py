"""What a dataset's files are and where they come from (torchvision-style constants).

Every real dataset source lists its files as :class:`Resource` constants: the
official URL, the checksum (``"md5:<hex>"`` or ``"sha256:<hex>"``; ``None``
where no trustworthy value is known -- the file is then fetched unverified and
``pfedmoap download`` says so), where it goes under the data root, and what
exists once it is in place. ``pfedmoap download`` (see
:mod:`pfedmoap_cli.data.download`) reads these; the dataset's recipe
(``data_recipes/<name>.toml``) repeats them for readers, and a test keeps the
two in agreement.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pfedmoap_cli.errors import DataError

CHECKSUM_ALGORITHMS = ("md5", "sha256")


@dataclass(frozen=True)
class Resource:
    """One file a dataset needs and how to get it.

    Attributes
    ----------
    file:
        Where the downloaded file is saved, relative to the data root
        (``"oxford_flowers/102flowers.tgz"``).
    url:
        Official source. For ``manual`` resources, the page to download it from.
    checksum:
        ``"md5:<hex>"`` / ``"sha256:<hex>"`` of the downloaded file, or ``None``
        when unknown (fetched unverified, with a warning).
    creates:
        Path (relative to the data root) that exists once the resource is in
        place: the file itself, or a folder its archive unpacks.
    extract_to:
        For archives: folder (relative to the data root) to unpack into;
        ``None`` for plain files.
    inner:
        For an archive that wraps another archive (Caltech101's zip holds
        ``101_ObjectCategories.tar.gz``): the inner archive's path inside the
        outer one; only the inner archive is unpacked into ``extract_to``.
    manual:
        True when the file cannot be fetched automatically (Google Drive):
        ``pfedmoap download`` prints where to get it and where to put it, and
        unpacks it once it is there.
    """

    file: str
    url: str
    checksum: str | None
    creates: str
    extract_to: str | None = None
    inner: str | None = None
    manual: bool = False

    def __post_init__(self) -> None:
        if self.checksum is not None:
            split_checksum(self.checksum)  # validates the format at import time


def split_checksum(checksum: str) -> tuple[str, str]:
    """``"md5:abc..."`` -> ``("md5", "abc...")``, refusing unknown algorithms or bad hex."""
    algorithm, sep, digest = checksum.partition(":")
    expected_len = {"md5": 32, "sha256": 64}.get(algorithm)
    if not sep or expected_len is None or len(digest) != expected_len or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"checksum {checksum!r} is not 'md5:<32 hex>' or 'sha256:<64 hex>'")
    return algorithm, digest


def file_digest(path: Path, algorithm: str, chunk_size: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks."""
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            hasher.update(chunk)
    return hasher.hexdigest()


def verify_file(path: Path, checksum: str | None) -> bool:
    """True when ``path`` exists and matches ``checksum`` (any existing file when it is ``None``)."""
    path = Path(path)
    if not path.is_file():
        return False
    if checksum is None:
        return True
    algorithm, digest = split_checksum(checksum)
    return file_digest(path, algorithm) == digest


def require_checksum(path: Path, checksum: str | None, fix: str) -> None:
    """Raise a one-line :class:`DataError` naming ``fix`` when ``path`` fails its checksum."""
    if checksum is None or verify_file(path, checksum):
        return
    algorithm, digest = split_checksum(checksum)
    actual = file_digest(path, algorithm) if Path(path).is_file() else "missing"
    raise DataError(f"checksum mismatch for {path} ({algorithm} {actual}, expected {digest}); {fix}")
