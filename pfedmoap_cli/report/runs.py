"""One row per run, derived from the runs' metrics CSVs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pfedmoap_cli.artifacts.metrics import read_metrics

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


def summarize_metrics(metrics: pd.DataFrame) -> RunSummary:
    """Summarise one run's metrics (PROTOCOL.md section 4).

    The headline is the unweighted mean over clients of the last round; the
    mean of the per-round means over the last 5 rounds is kept too. No round
    is ever selected by its test accuracy.
    """
    acc = metrics[(metrics["split"] == "test") & (metrics["metric"] == "accuracy")]
    if acc.empty:
        raise ValueError("no test accuracy rows")
    per_round = acc.groupby("round")["value"].mean().sort_index()
    last_round = int(per_round.index.max())
    final = acc[acc["round"] == last_round]
    weighted = float((final["value"] * final["num_examples"]).sum() / final["num_examples"].sum())
    first = acc.iloc[0]
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
    )


def summarize_runs(runs_dir: Path) -> pd.DataFrame:
    """A table with one row per run that has at least one evaluated round."""
    rows = []
    for metrics_csv in sorted(Path(runs_dir).glob("*/metrics.csv")):
        frame = read_metrics(metrics_csv)
        if not frame.empty and ((frame["split"] == "test") & (frame["metric"] == "accuracy")).any():
            rows.append(summarize_metrics(frame).__dict__)
    return pd.DataFrame(rows, columns=RUN_SUMMARY_COLUMNS)


def to_markdown(table: pd.DataFrame, digits: int = 2) -> str:
    """A GitHub-flavoured markdown table (no extra dependency needed)."""
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    lines = [header, rule]
    for _, row in table.iterrows():
        cells = [f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
