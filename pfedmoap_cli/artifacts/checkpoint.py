"""Checkpoints: safetensors files of trainable tensors with string metadata.

Only trainable state is stored (prompts, gating networks, personal modules);
CLIP itself is referenced by name and tag in the metadata, never copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pfedmoap_cli.artifacts.atomic import atomic_write
from pfedmoap_cli.errors import ArtifactError

CHECKPOINT_SCHEMA = "pfedmoap.checkpoint/1"


def save_checkpoint(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Atomically write ``tensors`` (moved to CPU, contiguous) with ``metadata``.

    A schema tag is added to the metadata; all metadata values must be strings.
    """
    payload = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    meta = {"schema": CHECKPOINT_SCHEMA, **{k: str(v) for k, v in metadata.items()}}
    atomic_write(Path(path), lambda tmp: save_file(payload, str(tmp), metadata=meta))


@dataclass(frozen=True)
class CheckpointIdentity:
    """Whose checkpoint a file must be, from where it lies: run, round, client ("server" for global), method."""

    run_id: str
    round: int
    client_id: str
    method: str


def check_identity(path: Path, metadata: Mapping[str, str], expected: CheckpointIdentity) -> None:
    """Raise :class:`ArtifactError` when ``metadata`` says the file belongs elsewhere.

    The method is compared first: another method's tensors would otherwise
    fail later with an obscure missing-key error.
    """
    fix = "delete that round's folder and resume with 'pfedmoap train --resume' (rounds from it are trained again)"
    if metadata.get("method") != expected.method:
        raise ArtifactError(
            f"checkpoint {path} was written by method {metadata.get('method')!r}, but this run uses {expected.method!r}; {fix}"
        )
    for key, want in (("run_id", expected.run_id), ("round", str(expected.round)), ("client_id", expected.client_id)):
        if metadata.get(key) != want:
            raise ArtifactError(f"checkpoint {path} has {key} {metadata.get(key)!r} in its metadata, expected {want!r} (a file copied from elsewhere?); {fix}")


def load_checkpoint(path: Path, expected: CheckpointIdentity | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint; return (tensors, metadata).

    ``expected``, when given, is checked against the file's metadata.

    Raises
    ------
    ArtifactError
        If the file is missing, unreadable, of another schema, or (with
        ``expected``) of another run, round, client or method.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} does not exist; resume from an earlier round or retrain")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise ArtifactError(f"checkpoint {path} is corrupt ({error}); delete the round folder and resume") from None
    if metadata.get("schema") != CHECKPOINT_SCHEMA:
        raise ArtifactError(
            f"checkpoint {path} has schema {metadata.get('schema')!r}, expected {CHECKPOINT_SCHEMA!r}; retrain the run"
        )
    if expected is not None:
        check_identity(path, metadata, expected)
    return tensors, metadata
