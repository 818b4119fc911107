"""Small file helpers shared by the real dataset sources (no registration here).

* :func:`load_pickle` reads the pickles datasets ship (FedBN's ``.pkl`` lists,
  CIFAR's batches) through an unpickler that only rebuilds plain containers and
  numpy arrays, so a tampered file cannot run code; a truncated or corrupt file
  becomes a one-line :class:`DataError` naming the fix.
* :func:`require_files` checks that every listed image exists, listing each
  folder once (a few thousand ``listdir`` calls instead of one ``stat`` per image).
* :func:`open_rgb` opens an image as RGB, or raises a :class:`DataError`.
"""

from __future__ import annotations

import os
import pickle
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from pfedmoap_cli.errors import DataError

# Globals a dataset pickle may reference: numpy array/dtype/scalar reconstruction
# (numpy 1 pickles say ``numpy.core``, numpy 2 ones ``numpy._core``), bytes, and nothing else.
_ALLOWED_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how Python 3 writes bytes into protocol-2 pickles
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_pickle(path: Path, fix: str, encoding: str = "ASCII") -> Any:
    """Unpickle ``path`` safely; any failure is a :class:`DataError` ending in ``fix``.

    Parameters
    ----------
    path:
        The pickle file.
    fix:
        What the user should do (e.g. "delete it and rerun 'pfedmoap download --dataset cifar10'").
    encoding:
        Passed to the unpickler (``"latin1"`` for Python 2 pickles such as CIFAR's).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is missing; {fix}")
    try:
        with open(path, "rb") as handle:
            return _DataUnpickler(handle, encoding=encoding).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError, UnicodeDecodeError) as error:
        reason = str(error) or type(error).__name__
        raise DataError(f"{path} is truncated or corrupt ({reason}); {fix}") from None


def require_files(base: Path, relpaths: Iterable[str], fix: str) -> None:
    """Raise a :class:`DataError` when any ``base / relpath`` is not an existing file.

    The message gives the count and the first missing path, then ``fix``.
    """
    by_dir: dict[str, list[str]] = defaultdict(list)
    for rel in relpaths:
        parent, _, name = rel.rpartition("/")
        by_dir[parent].append(name)
    missing: list[str] = []
    for parent, names in by_dir.items():
        folder = base / parent if parent else base
        try:
            present = set(os.listdir(folder))
        except OSError:
            present = set()
        missing.extend(f"{parent}/{n}" if parent else n for n in names if n not in present)
    if missing:
        missing.sort()
        raise DataError(f"{len(missing)} image(s) listed for {base} are missing, e.g. {base / missing[0]}; {fix}")


def open_rgb(path: Path, fix: str = "restore the file (rerun 'pfedmoap download') or remove it from the split") -> Image.Image:
    """Open an image file as RGB (grey and palette images are converted)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read image {path} ({error}); {fix}") from None


def not_found(path: Path, name: str, what: str) -> DataError:
    """The error for an absent dataset folder or file, naming both fixes."""
    return DataError(
        f"{what} {path} not found; run 'pfedmoap download --dataset {name}' "
        f"or pass --data-root pointing at the folder that holds it"
    )
