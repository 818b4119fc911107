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
* ``client_states``: where each client's latest state lives after the round,
  ``{"3": {"round": 7, "file": "round-0007/client-0003.safetensors", "sha256": ...}}``
  for every client with state. A round writes only the states that changed in
  it (its participants', or every client's for methods that personalise each
  round); the others stay where an earlier round wrote them, so this map
  alone makes the round's checkpoint set complete and verifiable;
* ``keep_rounds``: the ``--keep-rounds`` count in force when the round was
  written (``null``: all), so verification knows which earlier rounds'
  files may have been deleted since (:mod:`pfedmoap_cli.engine.retention`);
* ``sha256``: the hash of the canonical JSON of everything above, so an edited
  or truncated manifest is noticed as such.

Verification (:func:`verify_round`, :func:`verify_client_states`) raises
:class:`ArtifactError` naming the first file that is missing, extra or changed.
Manifests of schema ``pfedmoap.round/1`` (every client's state written every
round, nothing ever deleted) are still read: their ``client_states`` are the
client files of their own folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pfedmoap_cli.artifacts.atomic import atomic_write_text, sha256_file, sha256_json
from pfedmoap_cli.errors import ArtifactError

MANIFEST_SCHEMA = "pfedmoap.round/2"
#: Schemas this version reads (round/1: before client_states and keep_rounds).
READABLE_SCHEMAS = ("pfedmoap.round/1", MANIFEST_SCHEMA)
MANIFEST_NAME = "manifest.json"
#: The checkpoint files a manifest covers (everything a round folder should hold besides the manifest).
CHECKPOINT_GLOB = "*.safetensors"


@dataclass(frozen=True)
class FileEntry:
    """Identity of one checkpoint file of a round."""

    sha256: str
    size: int


@dataclass(frozen=True)
class ClientStateRef:
    """Where one client's latest state lies: the round that wrote it, its file (relative to checkpoints/), its hash."""

    round: int
    file: str
    sha256: str


@dataclass(frozen=True)
class RoundManifest:
    """The verified record of one complete round."""

    run_id: str
    round: int
    method: str
    files: dict[str, FileEntry]
    metrics: str  # the round's metrics.csv lines, verbatim
    client_states: dict[int, ClientStateRef] = field(default_factory=dict)
    keep_rounds: int | None = None  # None: every round's files are kept


def client_file_id(name: str) -> int | None:
    """The client id in a ``client-NNNN.safetensors`` name (None for any other name)."""
    stem = name.removesuffix(".safetensors")
    prefix, _, digits = stem.partition("-")
    return int(digits) if prefix == "client" and digits.isdigit() and name.endswith(".safetensors") else None


def round_folder_name(round_index: int) -> str:
    """``round-NNNN`` (as :meth:`RunPaths.round_dir` names it)."""
    return f"round-{round_index:04d}"


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
        "client_states": {
            str(c): {"round": ref.round, "file": ref.file, "sha256": ref.sha256} for c, ref in sorted(manifest.client_states.items())
        },
        "keep_rounds": manifest.keep_rounds,
    }


def _client_file(round_index: int, client_id: int) -> str:
    """Where round ``round_index`` writes client ``client_id``'s state, relative to checkpoints/."""
    return f"{round_folder_name(round_index)}/client-{client_id:04d}.safetensors"


def _own_client_states(round_index: int, files: dict[str, FileEntry]) -> dict[int, ClientStateRef]:
    """The client states a round folder holds itself, by client id."""
    found = {}
    for name, entry in files.items():
        client = client_file_id(name)
        if client is not None:
            found[client] = ClientStateRef(round_index, _client_file(round_index, client), entry.sha256)
    return found


def write_round_manifest(
    round_dir: Path,
    run_id: str,
    round_index: int,
    method: str,
    metrics: str,
    previous: RoundManifest | None = None,
    keep_rounds: int | None = None,
) -> RoundManifest:
    """Hash every checkpoint file in ``round_dir`` and write its manifest atomically.

    ``previous`` is the manifest of the round before (None for round 0): the
    clients this round did not write a state for keep the one it points to.
    """
    files = {path.name: _entry(path) for path in sorted(Path(round_dir).glob(CHECKPOINT_GLOB)) if not is_temp_file(path)}
    client_states = dict(previous.client_states) if previous is not None else {}
    client_states.update(_own_client_states(round_index, files))
    manifest = RoundManifest(run_id, round_index, method, files, metrics, client_states, keep_rounds)
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
        if body.get("schema") == MANIFEST_SCHEMA:
            states = {int(c): ClientStateRef(int(e["round"]), str(e["file"]), str(e["sha256"])) for c, e in body["client_states"].items()}
            keep = None if body["keep_rounds"] is None else int(body["keep_rounds"])
        else:  # round/1: every client's state in every round's own folder, nothing deleted
            states, keep = _own_client_states(int(body["round"]), files), None
        manifest = RoundManifest(str(body["run_id"]), int(body["round"]), str(body["method"]), files, str(body["metrics"]), states, keep)
        # A state lies where that round wrote it, never outside checkpoints/ nor in a later round.
        placed = all(ref.file == _client_file(ref.round, c) and 0 <= ref.round <= manifest.round for c, ref in states.items())
        ok = body.get("schema") in READABLE_SCHEMAS and claimed == sha256_json(body) and placed
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise RoundProblem(f"{path} is corrupt or was edited; resume the run with {_resume_command(round_dir)} to train that round again", f"{MANIFEST_NAME} is corrupt")
    return manifest


def verify_round(round_dir: Path, run_id: str, round_index: int, method: str, complete: bool = True) -> RoundManifest:
    """The manifest of ``round_dir`` after checking it and every file it lists.

    ``complete=False`` accepts listed files that are gone (deleted by
    ``--keep-rounds`` after later rounds); the files still there must match.

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
            if not complete:
                continue
            raise RoundProblem(f"checkpoint {path} is missing (round {round_index}'s manifest lists it); {fix}", f"{name} is missing")
        if name not in manifest.files:
            raise RoundProblem(f"checkpoint {path} is not in round {round_index}'s manifest (a file copied in?); remove it or {fix}", f"{name} is extra")
        if _entry(path) != manifest.files[name]:
            raise RoundProblem(f"checkpoint {path} changed since round {round_index} was written; {fix}", f"{name} changed")
    return manifest


def verify_client_states(checkpoints_dir: Path, manifest: RoundManifest, hashes: dict[Path, str] | None = None) -> None:
    """Check that every client state ``manifest`` points to exists and has its recorded hash.

    The files may lie in earlier rounds' folders (clients that did not train
    since). ``hashes`` caches file hashes across calls of one verification.

    Raises
    ------
    RoundProblem
        Naming the file, the client and the round whose manifest points to it.
    """
    hashes = {} if hashes is None else hashes
    round_dir = Path(checkpoints_dir) / round_folder_name(manifest.round)
    fix = f"resume the run with {_resume_command(round_dir)} (it trains again from the last round whose files verify) or restore the file"
    for client, ref in sorted(manifest.client_states.items()):
        path = Path(checkpoints_dir) / ref.file
        if not path.is_file():
            raise RoundProblem(
                f"checkpoint {path} (client {client}'s state in round {manifest.round}) is missing; {fix}", f"{ref.file} is missing"
            )
        if path not in hashes:
            hashes[path] = sha256_file(path)
        if hashes[path] != ref.sha256:
            raise RoundProblem(
                f"checkpoint {path} (client {client}'s state in round {manifest.round}) changed since round {ref.round} was written; {fix}",
                f"{ref.file} changed",
            )
