"""One row per run, derived from the runs' metrics CSVs.

A run whose metrics cannot be trusted (a torn or garbage line, or rows that
do not cover every client of every complete round) is left out with one
warning naming it and the fix: averaging it over fewer clients or rounds
would put a number in the report that no run produced.

Runs of a base-to-novel partition (rows of split "base" and "novel",
PROTOCOL-MORE.md section 6) get five more columns: Local (the usual mean
client test accuracy), Base, Novel, HM (harmonic mean of Base and Novel) and
HM3 (of Local, Base and Novel); other runs leave them empty, and a report
without such runs has none of them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from pfedmoap_cli.artifacts.metrics import METRIC_COLUMNS
from pfedmoap_cli.errors import UserError

#: Metric of a client that did not answer in a round (the recorder's ``MISSING_METRIC``).
MISSING_METRIC = "missing"
_INT_COLUMNS = ("seed", "round", "client_id", "num_examples")
_TEXT_COLUMNS = ("run_id", "method", "dataset", "partition_sha256", "domain", "split", "metric")

RUN_SUMMARY_COLUMNS = [
    "run_id",
    "method",
    "dataset",
    "seed",
    "rounds",
    "final_mean_acc",
    "last5_mean_acc",
    "final_weighted_acc",
    "min_client_acc",
    "max_client_acc",
    "clients",
]
#: The splits of base-to-novel scores (:mod:`pfedmoap_cli.engine.generalisation`).
GENERALISATION_SPLITS = ("base", "novel")
#: Columns added to the run listing when some run has base/novel rows (percent).
GENERALISATION_COLUMNS = ["local_acc", "base_acc", "novel_acc", "hm", "hm3"]


@dataclass(frozen=True)
class RunSummary:
    """Headline numbers of one run (accuracies in percent)."""

    run_id: str
    method: str
    dataset: str
    seed: int
    rounds: int
    final_mean_acc: float
    last5_mean_acc: float
    final_weighted_acc: float
    min_client_acc: float
    max_client_acc: float
    clients: int
    #: Base-to-novel runs (percent, final round, mean over clients): Local (= final_mean_acc),
    #: Base, Novel, HM (two-way, Base and Novel) and HM3 (three-way); None otherwise
    #: (novel, hm and hm3 also None for a method that records no novel scores).
    local_acc: float | None = None
    base_acc: float | None = None
    novel_acc: float | None = None
    hm: float | None = None
    hm3: float | None = None


def harmonic_mean(values: Iterable[float]) -> float:
    """The harmonic mean ``n / sum(1 / v)`` of non-negative values (0 when any is 0)."""
    values = [float(v) for v in values]
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def _final_split_mean(metrics: pd.DataFrame, split: str, last_round: int) -> float | None:
    """Mean over clients of ``split``'s accuracy in ``last_round`` (percent), None without such rows."""
    rows = metrics[(metrics["split"] == split) & (metrics["metric"] == "accuracy") & (metrics["round"] == last_round)]
    return None if rows.empty else 100 * float(rows["value"].mean())


def summarize_metrics(metrics: pd.DataFrame) -> RunSummary:
    """Summarise one run's metrics (PROTOCOL.md section 4).

    The headline is the unweighted mean over clients of the last round; the
    mean of the per-round means over the last 5 evaluated rounds (rounds with
    test rows: with ``--eval-every N`` every N-th round and the last) is kept
    too. No round is ever selected by its test accuracy.
    """
    acc = metrics[(metrics["split"] == "test") & (metrics["metric"] == "accuracy")]
    if acc.empty:
        raise ValueError("no test accuracy rows")
    per_round = acc.groupby("round")["value"].mean().sort_index()
    last_round = int(per_round.index.max())
    final = acc[acc["round"] == last_round]
    weighted = float((final["value"] * final["num_examples"]).sum() / final["num_examples"].sum())
    first = acc.iloc[0]
    local = 100 * float(per_round.iloc[-1])
    base = _final_split_mean(metrics, "base", last_round)
    novel = _final_split_mean(metrics, "novel", last_round) if base is not None else None
    both = base is not None and novel is not None
    return RunSummary(
        run_id=str(first["run_id"]),
        method=str(first["method"]),
        dataset=str(first["dataset"]),
        seed=int(first["seed"]),
        rounds=last_round + 1,
        final_mean_acc=100 * float(per_round.iloc[-1]),
        last5_mean_acc=100 * float(per_round.iloc[-5:].mean()),
        final_weighted_acc=100 * weighted,
        min_client_acc=100 * float(final["value"].min()),
        max_client_acc=100 * float(final["value"].max()),
        clients=int(final["client_id"].nunique()),
        local_acc=local if base is not None else None,
        base_acc=base,
        novel_acc=novel,
        hm=harmonic_mean([base, novel]) if both else None,
        hm3=harmonic_mean([local, base, novel]) if both else None,
    )


class DamagedMetrics(Exception):
    """A metrics CSV that cannot be read as rows of numbers (the message says where)."""


def read_metrics_checked(path: Path) -> pd.DataFrame:
    """Read a metrics CSV, refusing any line that is not a complete row.

    Returns the frame with the column types of
    :func:`pfedmoap_cli.artifacts.metrics.read_metrics`.

    Raises
    ------
    DamagedMetrics
        Wrong header, a line with too many or too few fields, or a
        non-number where a number belongs; the message names the line.
    """
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as error:
        raise DamagedMetrics(f"metrics.csv is not a readable CSV ({str(error).strip().splitlines()[0][:80]})") from None
    if list(raw.columns) != METRIC_COLUMNS:
        raise DamagedMetrics("metrics.csv does not start with the metrics header")
    frame = raw.copy()
    for column in _INT_COLUMNS:
        numbers = pd.to_numeric(raw[column], errors="coerce")
        bad = numbers.isna() | (numbers != numbers.round())
        if bad.any():
            raise DamagedMetrics(f"metrics.csv line {int(bad.idxmax()) + 2} has {column} {raw[column][bad.idxmax()]!r}, not an integer")
        frame[column] = numbers.astype("int64")
    values = pd.to_numeric(raw["value"], errors="coerce")
    # "nan" is how a diverged loss is written; anything else that is not a number is damage.
    bad = values.isna() & (raw["value"].str.strip().str.lower() != "nan")
    if bad.any():
        raise DamagedMetrics(f"metrics.csv line {int(bad.idxmax()) + 2} has value {raw['value'][bad.idxmax()]!r}, not a number")
    frame["value"] = values.astype("float64")
    accuracy = (frame["metric"] == "accuracy") & ~frame["value"].between(0.0, 1.0)
    if accuracy.any():
        raise DamagedMetrics(f"metrics.csv line {int(accuracy.idxmax()) + 2} has an accuracy outside [0, 1]")
    return frame


def incomplete_reason(
    frame: pd.DataFrame,
    completed_rounds: int | None,
    num_clients: int | None,
    evaluated: Callable[[int], bool] | None = None,
    required_splits: Iterable[str] = (),
) -> str | None:
    """Why a run's rows do not cover every client of every complete round, or ``None`` when they do.

    Parameters
    ----------
    frame:
        The run's metric rows.
    completed_rounds:
        Rounds complete per progress.json (rows of later rounds are ignored:
        a round is recorded before it is marked complete); ``None`` when
        unknown, then the rounds present are checked.
    num_clients:
        Clients of the run's partition; ``None`` when unknown, then every
        round must have the same clients as the others.
    evaluated:
        Which complete rounds scored their clients (``--eval-every``); the
        others have no test rows. ``None``: every round.
    required_splits:
        Base-to-novel splits (``"base"``, ``"novel"``) the run must have even
        when no row of them is present; a split with any row is checked anyway.

    Notes
    -----
    In a complete evaluated round each client has exactly one test ``accuracy`` row or
    a test ``missing`` row (a client that could not be scored is recorded as
    such). Anything less would make the round's mean one over fewer clients.
    The same holds for the ``base`` and ``novel`` accuracy rows of a
    base-to-novel run, in the rounds with test rows.
    """
    test = frame[frame["split"] == "test"]
    if completed_rounds is not None:
        test = test[test["round"] < completed_rounds]
    accuracy = test[test["metric"] == "accuracy"]
    missing = test[test["metric"] == MISSING_METRIC]
    rounds = range(completed_rounds) if completed_rounds is not None else sorted(set(accuracy["round"]) | set(missing["round"]))
    if evaluated is not None:
        rounds = [r for r in rounds if evaluated(r)]
    twice = accuracy.duplicated(["round", "client_id"])
    if twice.any():
        row = accuracy[twice].iloc[0]
        return f"client {int(row['client_id'])} has two test accuracy rows in round {int(row['round'])}"
    seen = {r: set(accuracy.loc[accuracy["round"] == r, "client_id"]) | set(missing.loc[missing["round"] == r, "client_id"]) for r in rounds}
    expected = set(range(num_clients)) if num_clients is not None else set().union(*seen.values()) if seen else set()
    for r in rounds:
        if not seen[r]:
            return f"round {r} has no test accuracy rows although progress.json counts {completed_rounds} rounds complete"
        lacking, extra = sorted(expected - seen[r]), sorted(seen[r] - expected)
        if lacking:
            return f"round {r} has no test accuracy (and no 'missing' row) for client(s) {', '.join(map(str, lacking[:5]))}"
        if extra:
            return f"round {r} has rows of client(s) {', '.join(map(str, extra[:5]))}, not in its partition of {num_clients} clients"
    present = set(frame.loc[frame["split"].isin(GENERALISATION_SPLITS), "split"])
    for split in [s for s in GENERALISATION_SPLITS if s in present or s in set(required_splits)]:
        reason = _split_incomplete(frame, split, rounds, expected, missing, completed_rounds)
        if reason is not None:
            return reason
    return None


def _split_incomplete(frame: pd.DataFrame, split: str, rounds, expected: set, missing: pd.DataFrame, completed_rounds: int | None) -> str | None:
    """Why ``split``'s accuracy rows do not cover every client of every evaluated round (None when they do)."""
    rows = frame[(frame["split"] == split) & (frame["metric"] == "accuracy")]
    if completed_rounds is not None:
        rows = rows[rows["round"] < completed_rounds]
    twice = rows.duplicated(["round", "client_id"])
    if twice.any():
        row = rows[twice].iloc[0]
        return f"client {int(row['client_id'])} has two {split} accuracy rows in round {int(row['round'])}"
    for r in rounds:
        have = set(rows.loc[rows["round"] == r, "client_id"]) | set(missing.loc[missing["round"] == r, "client_id"])
        lacking = sorted(expected - have)
        if lacking:
            return f"round {r} has no {split} accuracy for client(s) {', '.join(map(str, lacking[:5]))} (a base-to-novel run scores every client on base and novel)"
    return None


def _run_record(run_dir: Path) -> dict | None:
    """run.json as a dict, or None when it is absent or unreadable (then the checks that need it are skipped)."""
    try:
        record = json.loads((run_dir / "run.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _run_partition(run_dir: Path):
    """The run's partition (from run.json's partition file), or None when it cannot be read."""
    from pfedmoap_cli.artifacts.partition import load_partition

    record = _run_record(run_dir)
    if record is None or not isinstance(record.get("partition_file"), str):
        return None
    stored = Path(record["partition_file"])
    # Newer run records store the path relative to the workspace (two levels above runs/<id>).
    path = stored if stored.is_absolute() else Path(run_dir).parent.parent / stored
    try:
        return load_partition(path)[0]
    except UserError:
        return None


def run_num_clients(run_dir: Path) -> int | None:
    """Clients of the run's partition (from run.json's partition file), or None when it cannot be read."""
    partition = _run_partition(run_dir)
    return None if partition is None else partition.num_clients


def run_required_splits(run_dir: Path) -> tuple[str, ...]:
    """The base-to-novel splits every evaluated round of the run must have (none for other runs).

    "base" for a run of a base-to-novel partition; "novel" too unless its
    method records none (``label_set_free`` False; a method that cannot be
    looked up is held to the rows present).
    """
    partition = _run_partition(run_dir)
    if partition is None or not partition.base_to_novel:
        return ()
    record = _run_record(run_dir) or {}
    method = (record.get("settings") or {}).get("method") if isinstance(record.get("settings"), dict) else None
    try:
        from pfedmoap_cli.methods.base import get_method

        free = bool(get_method(str(method)).label_set_free)
    except UserError:
        free = False
    return ("base", "novel") if free else ("base",)


def run_evaluated_rounds(run_dir: Path) -> Callable[[int], bool] | None:
    """Which rounds of the run score their clients, from run.json's settings (None when it cannot be read: then every round)."""
    from pfedmoap_cli.engine.schedule import is_evaluated_round

    record = _run_record(run_dir)
    settings = record.get("settings") if record is not None else None
    if not isinstance(settings, dict) or not isinstance(settings.get("rounds"), int):
        return None
    every = settings.get("eval_every", 1)  # runs of versions before --eval-every scored every round
    if not isinstance(every, int) or every < 1:
        return None
    total = settings["rounds"]
    return lambda round_index: is_evaluated_round(round_index, total, every)


def run_completed_rounds(run_dir: Path) -> int:
    """Rounds complete per the run's progress.json (0 without one); a corrupt file raises its one-line :class:`UserError`."""
    from pfedmoap_cli.engine.run_record import completed_rounds
    from pfedmoap_cli.engine.workspace import RunPaths

    return completed_rounds(RunPaths(Path(run_dir)))


def damaged_run_warning(run_dir: Path, reason: str) -> str:
    """The one warning line of a run left out of a report: which run, why, and the fix.

    A run sealed by round manifests is repaired by resuming it (metrics.csv is
    rebuilt from the manifests, rounds that do not verify are trained again);
    an older run can only be trained again.
    """
    run_id = Path(run_dir).name
    if any(Path(run_dir).glob("checkpoints/round-*/manifest.json")):
        fix = f"'pfedmoap train --resume --run-id {run_id}' repairs it from its round manifests"
    else:
        fix = f"delete runs/{run_id} and train it again (pfedmoap train, or pfedmoap sweep for a table cell)"
    return f"warning: run {run_id} left out of the report: {reason}; {fix}"


def checked_run_metrics(run_dir: Path, completed: int | None = None) -> tuple[pd.DataFrame | None, str | None]:
    """(the run's rows of complete rounds, None), or (None, why the run cannot be reported).

    ``completed`` defaults to progress.json's count; the rows must be readable
    and cover every client of every complete round (:func:`incomplete_reason`).
    """
    run_dir = Path(run_dir)
    try:
        frame = read_metrics_checked(run_dir / "metrics.csv")
        if completed is None:
            completed = run_completed_rounds(run_dir)
    except (DamagedMetrics, UserError) as error:
        return None, str(error)
    from pfedmoap_cli.artifacts.manifest import MANIFEST_NAME
    from pfedmoap_cli.engine.run_record import metrics_problem
    from pfedmoap_cli.engine.workspace import RunPaths

    reason = incomplete_reason(frame, completed, run_num_clients(run_dir), run_evaluated_rounds(run_dir), run_required_splits(run_dir))
    if reason is None and any(run_dir.glob(f"checkpoints/round-*/{MANIFEST_NAME}")):
        # Rows that are all there can still have been edited: runs sealed by
        # round manifests are compared with the rows each manifest recorded.
        try:
            reason = metrics_problem(RunPaths(run_dir))
        except UserError as error:
            reason = str(error)
    if reason is not None:
        return None, reason
    return frame[frame["round"] < completed], None


def summarize_runs(runs_dir: Path, warn: Callable[[str], None] | None = None) -> pd.DataFrame:
    """A table with one row per run that has at least one complete, evaluated round.

    A run whose metrics are damaged or incomplete is left out and reported
    through ``warn`` (one line each), so one bad run never hides the others.
    """
    rows = []
    for metrics_csv in sorted(Path(runs_dir).glob("*/metrics.csv")):
        frame, reason = checked_run_metrics(metrics_csv.parent)
        if reason is not None:
            if warn is not None:
                warn(damaged_run_warning(metrics_csv.parent, reason))
            continue
        if not frame.empty and ((frame["split"] == "test") & (frame["metric"] == "accuracy")).any():
            rows.append(summarize_metrics(frame).__dict__)
    generalisation = any(row["base_acc"] is not None for row in rows)
    # Only a workspace with base-to-novel runs gets their columns: other listings stay as they were.
    columns = RUN_SUMMARY_COLUMNS + GENERALISATION_COLUMNS if generalisation else RUN_SUMMARY_COLUMNS
    return pd.DataFrame(rows, columns=columns)


def to_markdown(table: pd.DataFrame, digits: int = 2) -> str:
    """A GitHub-flavoured markdown table (no extra dependency needed)."""
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    lines = [header, rule]
    for _, row in table.iterrows():
        # A base-to-novel column of a run without that score (another run, or no novel rows) is left blank.
        cells = [
            "" if name in GENERALISATION_COLUMNS and isinstance(v, float) and math.isnan(v) else f"{v:.{digits}f}" if isinstance(v, float) else str(v)
            for name, v in zip(table.columns, row)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
