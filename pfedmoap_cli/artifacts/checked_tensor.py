"""Cache entries: one tensor in a safetensors file, with its key and the sha256 of its bytes.

The test-feature cache (:mod:`pfedmoap_cli.model.features`) and the decoded
training images (:mod:`pfedmoap_cli.data.decoded_images`) keep what they
computed in this form. An entry is written atomically; reading it back
checks that it is the entry asked for (its key, and whatever else the caller
expects of the tensor) and that its bytes still hash to what was recorded,
so a damaged or foreign entry is recomputed, never used.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch

from pfedmoap_cli.artifacts.atomic import atomic_write


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hex sha256 of a CPU tensor's bytes (row-major, native byte order as stored)."""
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def write_checked_tensor(path: Path, name: str, tensor: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write ``tensor`` as ``name`` with ``metadata`` (which must hold its ``key``) and its sha256, atomically."""
    from safetensors.torch import save_file

    recorded = {**metadata, "sha256": tensor_sha256(tensor)}
    atomic_write(Path(path), lambda tmp: save_file({name: tensor.contiguous()}, str(tmp), metadata=recorded))


def read_checked_tensor(path: Path, name: str, key: str, fits: Callable[[torch.Tensor], bool], what: str) -> tuple[torch.Tensor | None, str | None]:
    """``(tensor, None)`` for a sound entry, else ``(None, why it was not used)``.

    ``fits`` says whether the tensor has the dtype and shape the caller
    expects; ``what`` names the content in the message ("these features").
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensor = handle.get_tensor(name)
    except Exception:  # noqa: BLE001 - truncated, corrupt or foreign file: recompute it
        return None, "was damaged (unreadable)"
    if metadata.get("key") != key or not fits(tensor):
        return None, f"was damaged (it does not hold {what})"
    expected = metadata.get("sha256")
    if expected is None:
        # Written before entries carried a checksum: nothing tells a sound old
        # entry from one with flipped payload bytes, so it is recomputed once.
        return None, "has no checksum (an older version wrote it)"
    if tensor_sha256(tensor) != expected:
        return None, "was damaged (checksum mismatch)"
    return tensor, None
