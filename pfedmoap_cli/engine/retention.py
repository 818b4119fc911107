"""Which checkpoint files stay on disk (``--keep-rounds``), and deleting the others.

After round ``r`` is marked complete, with ``--keep-rounds N`` ("auto" is 1,
"all" keeps everything), what stays is:

* every checkpoint of the last N complete rounds (their folders whole);
* every client state their manifests point to (a client that has not trained
  since round 2 still lives in ``round-0002/``);
* the server checkpoint of the round just before the oldest kept round:
  ``pfedmoap evaluate`` re-scores a round from the server state it started
  from (pFedMoAP's and FedOTP's scores depend on it), so with it every kept
  round can be re-scored;
* every round's ``manifest.json``: it holds the round's metric rows, which
  ``metrics.csv`` is rebuilt from and ``report`` checks against.

Everything else in older round folders is deleted, and only after the new
round is complete, so a kill at any moment leaves the last complete round
whole. Deletions that a kill interrupted are finished by the next resume
(:func:`prune_rounds` runs again there). Each manifest records the count in
force when it was written, so verification knows which older rounds may
lack files (:func:`whole_from`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pfedmoap_cli.artifacts.manifest import CHECKPOINT_GLOB, RoundManifest, RoundProblem, is_temp_file, read_round_manifest
from pfedmoap_cli.engine.workspace import RunPaths
from pfedmoap_cli.errors import ArtifactError

SERVER_FILE = "global.safetensors"


def whole_from(manifests: Sequence[RoundManifest]) -> int:
    """The first round whose files no ``--keep-rounds`` deletion may have touched.

    Round ``m`` written with count ``k`` may have deleted the files of rounds
    before ``m - k + 1``; the latest such bound over all manifests holds.
    Runs that keep everything (and runs of older versions) return 0.
    """
    bound = 0
    for manifest in manifests:
        if manifest.keep_rounds is not None:
            bound = max(bound, manifest.round - manifest.keep_rounds + 1)
    return bound


def files_to_keep(paths: RunPaths, kept_manifests: Sequence[RoundManifest], first_kept: int) -> set[Path]:
    """The checkpoint files the rules above keep, given the manifests of the kept rounds (from round ``first_kept`` on)."""
    kept: set[Path] = set()
    checkpoints = paths.root / "checkpoints"
    for manifest in kept_manifests:
        kept.update(paths.round_dir(manifest.round) / name for name in manifest.files)
        kept.update(checkpoints / ref.file for ref in manifest.client_states.values())
    if first_kept > 0:
        kept.add(paths.global_checkpoint(first_kept - 1))  # the start state of the oldest kept round
    return kept


def prune_rounds(paths: RunPaths, completed: int, keep: int | None) -> list[Path]:
    """Delete the checkpoint files of rounds before the last ``keep`` that no kept round needs; return them.

    Call only once ``completed`` rounds are marked complete (their manifests
    are then all on disk and verified or just written). Only the kept rounds'
    manifests are read: a round's pruning costs the same in round 5 and 500.
    """
    if keep is None or completed <= keep:
        return []
    first_kept = completed - keep
    kept = files_to_keep(paths, [read_round_manifest(paths.round_dir(r)) for r in range(first_kept, completed)], first_kept)
    deleted = []
    for round_index in range(first_kept):
        for path in sorted(paths.round_dir(round_index).glob(CHECKPOINT_GLOB)):
            if path not in kept and not is_temp_file(path):
                path.unlink()
                deleted.append(path)
    return deleted


def missing_for_evaluation(paths: RunPaths, round_index: int) -> str | None:
    """Which file re-scoring ``round_index`` needs is not on disk (None when all are).

    It needs the round's server checkpoint and client states and the server
    checkpoint of the round before (its start state). Only presence is
    checked here; hashes are checked when the files are read.
    """
    manifest = read_round_manifest(paths.round_dir(round_index))
    needed = [paths.global_checkpoint(round_index)] + [paths.root / "checkpoints" / ref.file for ref in manifest.client_states.values()]
    if round_index > 0:
        needed.append(paths.global_checkpoint(round_index - 1))
    for path in needed:
        if not path.is_file():
            return str(path.relative_to(paths.root))
    return None


def _deletion_bound(paths: RunPaths, completed: int) -> int:
    """:func:`whole_from` over the readable manifests of the first ``completed`` rounds."""
    manifests = []
    for r in range(completed):
        try:
            manifests.append(read_round_manifest(paths.round_dir(r)))
        except RoundProblem:
            break
    return whole_from(manifests)


def _deleted(paths: RunPaths, round_index: int, bound: int) -> bool:
    """Whether ``--keep-rounds`` deleted a file re-scoring ``round_index`` needs.

    Files missing where no deletion reached (the round and, for its start
    state, the one before lie past ``bound``) are damage, not policy: the
    manifest checks name those.
    """
    if max(round_index - 1, 0) >= bound:
        return False
    try:
        return missing_for_evaluation(paths, round_index) is not None
    except RoundProblem:
        return False  # an unreadable manifest: re-scoring the round reports it


def rescorable_rounds(paths: RunPaths, completed: int) -> list[int]:
    """The complete rounds ``--keep-rounds`` has not deleted the checkpoints of (damaged ones included: re-scoring names the damage)."""
    bound = _deletion_bound(paths, completed)
    return [r for r in range(completed) if not _deleted(paths, r, bound)]


def refuse_deleted_round(paths: RunPaths, run_id: str, round_index: int, completed: int) -> None:
    """Raise a one-line :class:`ArtifactError` when ``--keep-rounds`` deleted what re-scoring ``round_index`` needs."""
    if not _deleted(paths, round_index, _deletion_bound(paths, completed)):
        return
    kept = rescorable_rounds(paths, completed)
    where = f"rounds {kept[0]}-{kept[-1]}" if len(kept) > 1 else f"round {kept[0]}" if kept else "no round"
    raise ArtifactError(
        f"round {round_index} of run {run_id} cannot be re-scored: --keep-rounds deleted its checkpoints (only {where} can be); "
        "train with --keep-rounds all to keep every round"
    )
