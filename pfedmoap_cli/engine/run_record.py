"""run.json (what a run is) and progress.json (how far it got)."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pfedmoap_cli import __version__
from pfedmoap_cli.artifacts.atomic import atomic_write_text, sha256_json
from pfedmoap_cli.artifacts.manifest import (
    MANIFEST_NAME,
    RoundManifest,
    RoundProblem,
    is_temp_file,
    read_round_manifest,
    verify_client_states,
    verify_round,
)
from pfedmoap_cli.artifacts.metrics import METRIC_COLUMNS, METRICS_HEADER, write_metrics_text
from pfedmoap_cli.engine.retention import prune_rounds, whole_from
from pfedmoap_cli.engine.settings import TrainSettings, backbone_spec, settings_from_json
from pfedmoap_cli.engine.workspace import RunPaths
from pfedmoap_cli.errors import ArtifactError

RUN_SCHEMA = "pfedmoap.run/1"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a run's numbers."""
    import torch

    from pfedmoap_cli.compat import import_open_clip

    return {
        "pfedmoap": __version__,
        "torch": torch.__version__,
        "open_clip": getattr(import_open_clip(), "__version__", "unknown"),
        "python": platform.python_version(),
    }


#: Keys every run.json must hold, with their JSON types.
REQUIRED_KEYS: dict[str, type] = {
    "run_id": str,
    "dataset": str,
    "partition_file": str,
    "partition_sha256": str,
    "settings": dict,
}


def _workspace_root_of(paths: RunPaths) -> Path:
    """The workspace a run folder lies in (runs/<id> under it; see :class:`Workspace`)."""
    return paths.root.parent.parent


def _stored_partition_path(partition_file: Path, workspace_root: Path) -> str:
    """``partition_file`` relative to the workspace when inside it (a moved workspace keeps working), else absolute."""
    absolute = Path(partition_file).resolve()
    try:
        return absolute.relative_to(Path(workspace_root).resolve()).as_posix()
    except ValueError:
        return str(absolute)


def partition_path_of(record: dict[str, Any], workspace_root: Path) -> Path:
    """Where the partition of a run record is: relative paths are under ``workspace_root``; old absolute ones as they are."""
    stored = Path(record["partition_file"])
    return stored if stored.is_absolute() else Path(workspace_root) / stored


def write_run_record(
    paths: RunPaths,
    run_id: str,
    settings: TrainSettings,
    dataset: str,
    partition_file: Path,
    partition_sha256: str,
    workspace_root: Path | None = None,
) -> None:
    """Write run.json: resolved settings (and their hash), partition and weights identity, versions."""
    settings_json = settings.to_json()
    record = {
        "schema": RUN_SCHEMA,
        "run_id": run_id,
        "dataset": dataset,
        "partition_file": _stored_partition_path(partition_file, workspace_root or _workspace_root_of(paths)),
        "partition_sha256": partition_sha256,
        "seed": settings.seed,
        "settings": settings_json,
        # Guards the settings against hand edits: a changed lr would silently
        # make the rest of a resumed run a different experiment.
        "settings_sha256": sha256_json(settings_json),
        "weights": backbone_spec(settings).identity(),
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(paths.run_json, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_run_record(paths: RunPaths) -> dict[str, Any]:
    """Read and check run.json; raise :class:`ArtifactError` when absent, malformed or edited."""
    if not paths.run_json.is_file():
        raise ArtifactError(f"no run at {paths.root}; list runs with 'pfedmoap report' or start one with 'pfedmoap train'")
    try:
        record = json.loads(paths.run_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{paths.run_json} is not valid JSON; delete the run folder and train again") from None
    if not isinstance(record, dict) or record.get("schema") != RUN_SCHEMA:
        raise ArtifactError(f"{paths.run_json} is not a {RUN_SCHEMA} record; delete the run folder and train again")
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(record.get(key), kind):
            raise ArtifactError(f"{paths.run_json} lacks a valid {key!r}; restore it or delete the run folder and train again")
    # Records of older versions have no hash; their settings are taken as written.
    if "settings_sha256" in record and record["settings_sha256"] != sha256_json(record["settings"]):
        raise ArtifactError(
            f"run.json of run {record['run_id']} was edited (its settings no longer match their recorded hash); restore it or start a new run"
        )
    return record


def run_settings(record: dict[str, Any]) -> TrainSettings:
    """The resolved settings stored in a run record."""
    try:
        return settings_from_json(record["settings"])
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(
            f"run.json of run {record.get('run_id')} has unreadable settings ({error}); restore it or start a new run"
        ) from None


# ---- progress.json ---------------------------------------------------------
def _progress_value(paths: RunPaths, total_rounds: int | None) -> tuple[int | None, str | None]:
    """(completed rounds, None) from progress.json, or (None, why it is invalid); (0, None) when absent."""
    if not paths.progress_json.is_file():
        return 0, None
    try:
        data = json.loads(paths.progress_json.read_text())
        value = data["completed_rounds"]
        total = data.get("total_rounds") if total_rounds is None else total_rounds
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None, "it is not a progress record"
    # bool is an int in Python; true is not a round count.
    if not isinstance(value, int) or isinstance(value, bool):
        return None, f"completed_rounds is {value!r}, not a number of rounds"
    if value < 0 or (isinstance(total, int) and value > total):
        return None, f"completed_rounds is {value}, outside 0..{total}"
    return value, None


def completed_rounds(paths: RunPaths, total_rounds: int | None = None) -> int:
    """How many rounds of the run are complete, per progress.json (checked to lie in 0..total rounds).

    ``total_rounds`` defaults to the total recorded next to the count. Whether
    the rounds' files verify is :func:`prepare_resume`'s and ``evaluate``'s check.
    """
    value, problem = _progress_value(paths, total_rounds)
    if value is None:
        raise ArtifactError(
            f"{paths.progress_json} is invalid ({problem}); run 'pfedmoap train --resume --run-id {paths.root.name}' "
            "to rebuild it from the rounds that verify"
        )
    return value


def progress_note(paths: RunPaths, total_rounds: int) -> str:
    """``done/total`` for messages, per progress.json (``?`` when it is invalid)."""
    value, _ = _progress_value(paths, total_rounds)
    return f"{'?' if value is None else value}/{total_rounds}"


def mark_round_complete(paths: RunPaths, rounds_done: int, total_rounds: int) -> None:
    """Record that ``rounds_done`` rounds are complete; written last in a round."""
    atomic_write_text(
        paths.progress_json,
        json.dumps({"completed_rounds": rounds_done, "total_rounds": total_rounds, "finished": rounds_done >= total_rounds}) + "\n",
    )


# ---- verifying rounds --------------------------------------------------------
@dataclass(frozen=True)
class VerifiedRounds:
    """The longest run of rounds 0, 1, ... whose manifests and files verify."""

    count: int
    rows: tuple[str, ...]  # each verified round's metrics.csv lines, in round order
    problem: RoundProblem | None  # why round ``problem_round`` does not verify (None: round ``count``'s folder is absent)
    manifests: tuple[RoundManifest, ...] = ()  # the verified rounds' manifests, in round order
    #: The round ``problem`` is about: ``count``, or a later one when the
    #: rounds in between lack checkpoints --keep-rounds deleted.
    problem_round: int | None = None


def round_folders(paths: RunPaths) -> dict[int, Path]:
    """Every ``checkpoints/round-NNNN`` folder of the run, by round."""
    found = {}
    for folder in (paths.root / "checkpoints").glob("round-*"):
        suffix = folder.name.removeprefix("round-")
        if folder.is_dir() and suffix.isdigit():
            found[int(suffix)] = folder
    return found


def _read_manifests(paths: RunPaths, run_id: str, method: str, total_rounds: int) -> tuple[list[RoundManifest], RoundProblem | None]:
    """The manifests of rounds 0, 1, ... up to the first round folder that is absent or whose manifest is bad."""
    manifests: list[RoundManifest] = []
    for round_index in range(total_rounds):
        folder = paths.round_dir(round_index)
        if not folder.is_dir():
            return manifests, None
        try:
            manifests.append(read_round_manifest(folder))
        except RoundProblem as problem:
            return manifests, problem
    return manifests, None


def _has_server_state(paths: RunPaths, manifest: RoundManifest) -> None:
    """Raise :class:`RoundProblem` when a round's server checkpoint is gone (a verified file is never half there)."""
    path = paths.global_checkpoint(manifest.round)
    if "global.safetensors" in manifest.files and not path.is_file():
        raise RoundProblem(f"checkpoint {path} is missing (round {manifest.round}'s manifest lists it)", "global.safetensors is missing")


def verified_rounds(paths: RunPaths, run_id: str, method: str, total_rounds: int) -> VerifiedRounds:
    """Check round folders in order; count rounds up to the last one a run can continue from.

    Every round's manifest must verify, and so must the files still in its
    folder. Rounds no ``--keep-rounds`` deletion can have touched
    (:func:`~pfedmoap_cli.engine.retention.whole_from`; every round when all
    are kept) must have all their files: the first that does not ends the
    count. The last counted round must hold a whole checkpoint set: its
    server state and every client state its manifest points to (in whichever
    round's folder), each with its recorded hash; if not, the count falls back
    to the latest round that does (with "auto", usually none but the last).
    """
    read, problem = _read_manifests(paths, run_id, method, total_rounds)
    problem_round = len(read) if problem is not None else None
    whole = whole_from(read)
    manifests: list[RoundManifest] = []
    for manifest in read:
        try:
            manifests.append(verify_round(paths.round_dir(manifest.round), run_id, manifest.round, method, complete=manifest.round >= whole))
        except RoundProblem as found:
            problem, problem_round = found, manifest.round
            break
    hashes: dict[Path, str] = {}
    while manifests:
        try:
            _has_server_state(paths, manifests[-1])
            verify_client_states(paths.root / "checkpoints", manifests[-1], hashes)
            break
        except RoundProblem as found:
            if problem is None:  # the first problem is the cause; the rounds before lack what was deleted
                problem, problem_round = found, manifests[-1].round
            manifests.pop()
    return VerifiedRounds(len(manifests), tuple(m.metrics for m in manifests), problem, tuple(manifests), problem_round)


def _refuse_old_run(paths: RunPaths, run_id: str, claimed: int | None) -> None:
    """Runs of versions before round manifests cannot be verified, so they are not resumed."""
    if claimed and not any((folder / MANIFEST_NAME).is_file() for folder in round_folders(paths).values()):
        raise ArtifactError(
            f"run {run_id} was written by an older pfedmoap version (its rounds have no {MANIFEST_NAME}) and cannot be resumed; "
            f"delete {paths.root} and train it again"
        )


# ---- metrics.csv against the verified rounds ------------------------------------------
def _round_of_line(line: str) -> int | None:
    """The round column of a metrics CSV line (None when the line is not a row)."""
    try:
        cells = next(csv.reader([line]))
        return int(cells[METRIC_COLUMNS.index("round")]) if len(cells) == len(METRIC_COLUMNS) else None
    except (StopIteration, ValueError, csv.Error):
        return None


def _metrics_disagreement(paths: RunPaths, rows: tuple[str, ...], allow_later_rounds: bool) -> str | None:
    """Why metrics.csv is not exactly the header and ``rows`` (None when it is).

    ``allow_later_rounds``: rows of rounds after the verified ones are expected
    after an interruption (written before the round's manifest) and are not a problem.
    """
    expected = METRICS_HEADER + "".join(rows)
    if not paths.metrics_csv.is_file():
        return None if not rows else "is missing"
    try:
        text = paths.metrics_csv.read_text()
    except UnicodeDecodeError:
        return "is not text"
    if text == expected:
        return None
    if not text.startswith(METRICS_HEADER):
        return "has a damaged header"
    if text.startswith(expected):
        extra = text[len(expected):].splitlines(keepends=True)
        rounds = [_round_of_line(line) for line in extra]
        if allow_later_rounds and all(r is not None and r >= len(rows) for r in rounds) and text.endswith("\n"):
            return None
        bad = [line for line, r in zip(extra, rounds) if r is None or r < len(rows)]
        if bad:
            return f"has a line that is no verified round's row ({bad[0].strip()[:60]!r})"
        return f"has {len(extra)} rows of rounds that do not verify"
    have = text[len(METRICS_HEADER):].splitlines(keepends=True)
    want = "".join(rows).splitlines(keepends=True)
    present = set(have)
    missing = [line for line in want if line not in present]
    if missing:
        return f"lacks {len(missing)} row(s) of the verified rounds (first: round {_round_of_line(missing[0])})"
    return "does not hold exactly the verified rounds' rows in order"


def metrics_problem(paths: RunPaths) -> str | None:
    """Why the run's metrics.csv disagrees with its verified rounds (None when it holds exactly their rows).

    Rounds count as complete as far as progress.json says; each must verify
    against its manifest. A run without any manifest (written by an older
    version) is reported as such.
    """
    record = read_run_record(paths)
    settings = run_settings(record)
    claimed, invalid = _progress_value(paths, settings.rounds)
    if invalid:
        return f"progress.json is invalid ({invalid})"
    if claimed and not any((f / MANIFEST_NAME).is_file() for f in round_folders(paths).values()):
        return f"run {record['run_id']} has no round manifests (written by an older pfedmoap version); train it again"
    check = verified_rounds(paths, record["run_id"], settings.method, claimed)
    if check.count < claimed:
        why = check.problem.short if check.problem else "its folder is missing"
        return f"round {check.count if check.problem_round is None else check.problem_round} does not verify ({why})"
    problem = _metrics_disagreement(paths, check.rows, allow_later_rounds=False)
    return f"metrics.csv {problem}" if problem else None


# ---- resume ----------------------------------------------------------------
def _say(note: str) -> None:
    print(note, file=sys.stderr, flush=True)


def remove_temp_files(root: Path) -> list[Path]:
    """Delete leftovers of interrupted atomic writes (``.<name>.XXXX.tmp``) under ``root``."""
    leftovers = [path for path in Path(root).rglob(".*.tmp") if path.is_file() and is_temp_file(path)]
    for path in leftovers:
        path.unlink()
    return leftovers


def prepare_resume(paths: RunPaths, run_id: str, method: str, total_rounds: int, say: Callable[[str], None] = _say) -> int:
    """Bring a run folder back to its last verified round; return how many rounds are complete.

    Rounds count only as far as their manifests (and every earlier round's)
    verify. Unverified round folders are removed, metrics.csv is rebuilt from
    the manifests' rows when it does not hold exactly them, progress.json is
    rewritten when it disagrees, and temp files of interrupted writes are
    deleted. Each repair a user would not expect is said in one line. Calling
    it again on a consistent run changes nothing and says nothing.

    Raises
    ------
    ArtifactError
        The run was written by a version without round manifests.
    """
    remove_temp_files(paths.root)
    claimed, invalid = _progress_value(paths, total_rounds)
    _refuse_old_run(paths, run_id, claimed)
    check = verified_rounds(paths, run_id, method, total_rounds)
    done = check.count
    after = f"resuming after round {done - 1}" if done else "starting again from round 0"
    if check.problem is not None:
        say(f"{after}: round {check.problem_round}'s files do not verify ({check.problem.short}); rounds from {done} are trained again")
    elif invalid:
        say(f"{after}: progress.json of run {run_id} is invalid ({invalid}); rebuilt it from the {done} round(s) that verify")
    elif claimed is not None and claimed > done:
        say(f"{after}: progress.json says {claimed} rounds are complete but round {done}'s files are missing; rounds from {done} are trained again")
    for round_index, folder in sorted(round_folders(paths).items()):
        if round_index >= done:
            shutil.rmtree(folder)
    problem = _metrics_disagreement(paths, check.rows, allow_later_rounds=True)
    if done == 0:
        paths.metrics_csv.unlink(missing_ok=True)
    elif problem is not None:
        say(f"metrics.csv of run {run_id} {problem}; rebuilt it from the round manifests")
        write_metrics_text(paths.metrics_csv, "".join(check.rows))
    elif paths.metrics_csv.read_text() != METRICS_HEADER + "".join(check.rows):
        write_metrics_text(paths.metrics_csv, "".join(check.rows))  # drop the rows of an unfinished round
    if done == 0:
        paths.progress_json.unlink(missing_ok=True)
    elif claimed != done:
        mark_round_complete(paths, done, total_rounds)
    if done:
        # Finishes deletions a kill interrupted (with the count the last round was written with).
        prune_rounds(paths, done, check.manifests[-1].keep_rounds)
    return done
