"""Round manifests: what a complete round wrote, so it can be verified before it is trusted.

``checkpoints/round-NNNN/manifest.json`` is written after a round's metric rows
and checkpoints and before ``progress.json`` marks the round complete. It holds

* ``schema``, ``run_id``, ``round``, ``method``: whose round this is;
* ``files``: ``{name: {"sha256": ..., "size": ...}}`` for every checkpoint file
  in the round folder;
* ``metrics``: the round's rows of ``metrics.csv``, verbatim (CSV lines without
  the header), so ``metrics.csv`` can be rebuilt byte for byte from the
  manifests. They live inside the manifest rather than in a second file so a
  round's record is one atomic write with nothing else to keep in step;
* ``sha256``: the hash of the canonical JSON of everything above, so an edited
  or truncated manifest is noticed as such.

Verification (:func:`verify_round`) raises :class:`ArtifactError` naming the
first file that is missing, extra or changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pfedmoap_cli.artifacts.atomic import atomic_write_text, sha256_file, sha256_json
from pfedmoap_cli.errors import ArtifactError

MANIFEST_SCHEMA = "pfedmoap.round/1"
MANIFEST_NAME = "manifest.json"
#: The checkpoint files a manifest covers (everything a round folder should hold besides the manifest).
CHECKPOINT_GLOB = "*.safetensors"


@dataclass(frozen=True)
class FileEntry:
    """Identity of one checkpoint file of a round."""

    sha256: str
    size: int


@dataclass(frozen=True)
class RoundManifest:
    """The verified record of one complete round."""

    run_id: str
    round: int
    method: str
    files: dict[str, FileEntry]
    metrics: str  # the round's metrics.csv lines, verbatim


class RoundProblem(ArtifactError):
    """A round's files do not match its manifest; ``short`` says how in a few words (for resume notes)."""

    def __init__(self, message: str, short: str) -> None:
        super().__init__(message)
        self.short = short


def is_temp_file(path: Path) -> bool:
    """A leftover of an interrupted atomic write (``.<name>.XXXX.tmp``)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _resume_command(round_dir: Path) -> str:
    """The command that retrains from an unverified round (round folders lie in runs/<id>/checkpoints/)."""
    return f"'pfedmoap train --resume --run-id {Path(round_dir).parent.parent.name}'"


def _entry(path: Path) -> FileEntry:
    return FileEntry(sha256=sha256_file(path), size=path.stat().st_size)


def _body(manifest: RoundManifest) -> dict[str, Any]:
    return {
        "schema": MANIFEST_SCHEMA,
        "run_id": manifest.run_id,
        "round": manifest.round,
        "method": manifest.method,
        "files": {name: {"sha256": e.sha256, "size": e.size} for name, e in sorted(manifest.files.items())},
        "metrics": manifest.metrics,
    }


def write_round_manifest(round_dir: Path, run_id: str, round_index: int, method: str, metrics: str) -> RoundManifest:
    """Hash every checkpoint file in ``round_dir`` and write its manifest atomically."""
    files = {path.name: _entry(path) for path in sorted(Path(round_dir).glob(CHECKPOINT_GLOB)) if not is_temp_file(path)}
    manifest = RoundManifest(run_id, round_index, method, files, metrics)
    body = _body(manifest)
    body["sha256"] = sha256_json(body)
    atomic_write_text(Path(round_dir) / MANIFEST_NAME, json.dumps(body, indent=1, sort_keys=True) + "\n")
    return manifest


def read_round_manifest(round_dir: Path) -> RoundManifest:
    """Parse a round's manifest and check its own hash (not yet the files it lists)."""
    path = Path(round_dir) / MANIFEST_NAME
    if not path.is_file():
        raise RoundProblem(f"{path} does not exist, so round {round_dir.name} is not complete; resume the run with {_resume_command(round_dir)} to train it again", f"{MANIFEST_NAME} is missing")
    try:
        body = json.loads(path.read_text())
        claimed = body.pop("sha256")
        files = {str(n): FileEntry(str(e["sha256"]), int(e["size"])) for n, e in body["files"].items()}
        manifest = RoundManifest(str(body["run_id"]), int(body["round"]), str(body["method"]), files, str(body["metrics"]))
        ok = body.get("schema") == MANIFEST_SCHEMA and claimed == sha256_json(body)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise RoundProblem(f"{path} is corrupt or was edited; resume the run with {_resume_command(round_dir)} to train that round again", f"{MANIFEST_NAME} is corrupt")
    return manifest


def verify_round(round_dir: Path, run_id: str, round_index: int, method: str) -> RoundManifest:
    """The manifest of ``round_dir`` after checking it and every file it lists.

    Raises
    ------
    RoundProblem
        (an :class:`ArtifactError`) naming the missing, extra or changed file.
    """
    round_dir = Path(round_dir)
    fix = f"resume the run with {_resume_command(round_dir)} (it trains that round again) or restore the file"
    manifest = read_round_manifest(round_dir)
    if (manifest.run_id, manifest.round, manifest.method) != (run_id, round_index, method):
        where = f"run {manifest.run_id} round {manifest.round} ({manifest.method})"
        raise RoundProblem(f"{round_dir / MANIFEST_NAME} belongs to {where}, not to this run's round {round_index}; {fix}", f"{MANIFEST_NAME} is another round's")
    present = {p.name for p in round_dir.glob(CHECKPOINT_GLOB) if not is_temp_file(p)}
    for name in sorted(set(manifest.files) | present):
        path = round_dir / name
        if name not in present:
            raise RoundProblem(f"checkpoint {path} is missing (round {round_index}'s manifest lists it); {fix}", f"{name} is missing")
        if name not in manifest.files:
            raise RoundProblem(f"checkpoint {path} is not in round {round_index}'s manifest (a file copied in?); remove it or {fix}", f"{name} is extra")
        if _entry(path) != manifest.files[name]:
            raise RoundProblem(f"checkpoint {path} changed since round {round_index} was written; {fix}", f"{name} changed")
    return manifest
