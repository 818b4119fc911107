"""PNG figures of a paper table's finished runs (matplotlib, an optional extra).

* ``<table>_rounds.png``: mean client accuracy per evaluated round per method
  (mean over seeds, band = min..max over seeds), one panel per dataset; runs
  trained with ``--eval-every N`` have a point every N rounds and at the end;
* ``<table>_clients.png``: the distribution of last-round per-client accuracy
  per method (box plot over clients x seeds), one panel per dataset;
* ``<table>_attention_<dataset>_<row>.png``: for pFedMoAP rows, the mean
  attention weight each client gives each expert (over the rounds it had
  experts and over seeds), from the ``attention_cXXXX`` metric rows; the
  diagonal is the client's own (local) prompt.

matplotlib is imported lazily: without it the tables still build, and
:func:`plots_available` says how to get it.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from pfedmoap_cli.report.cells import DONE
from pfedmoap_cli.report.tables import TableReport

INSTALL_HINT = "plots need matplotlib: pip install 'pfedmoap[plots]'"
_ATTENTION = re.compile(r"^attention_c(\d+)$")


def plots_available() -> bool:
    """Whether matplotlib can be imported (it is the optional ``plots`` extra)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _accuracy(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[(frame["split"] == "test") & (frame["metric"] == "accuracy")]


def _runs_by_cell(report: TableReport) -> dict[tuple[str, str], list[pd.DataFrame]]:
    """(dataset, row) -> metrics of its finished runs, in seed order."""
    grouped: dict[tuple[str, str], list[pd.DataFrame]] = {}
    for run in report.runs:
        if run.status == DONE and run.run_id in report.metrics:
            grouped.setdefault((run.dataset, run.row), []).append(report.metrics[run.run_id])
    return grouped


def _suptitle(fig, text: str) -> None:
    """A figure title wrapped to the figure's width (long table titles otherwise get cut)."""
    chars = max(40, int(fig.get_figwidth() * 13))
    fig.suptitle(textwrap.fill(text, chars), fontsize=9)


def _row_colour(index: int, rows: int):
    """A fixed colour per table row, the same in every panel (tab20 beyond 10 rows)."""
    if rows <= 10:
        return f"C{index}"
    import matplotlib

    return matplotlib.colormaps["tab20"](index % 20)


def _grid(plt, panels: int, width: float = 5.0, height: float = 3.6):
    cols = min(panels, 3)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:panels])


def plot_rounds(report: TableReport, out: Path) -> Path | None:
    """Mean client accuracy per round per method, one panel per dataset."""
    runs = _runs_by_cell(report)
    datasets = [d for d in report.recipe.datasets if any((d.key, r.key) in runs for r in report.recipe.rows)]
    if not datasets:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = _grid(plt, len(datasets))
    for ax, spec in zip(axes, datasets):
        curves_of = {}
        for row in report.recipe.rows:
            frames = runs.get((spec.key, row.key))
            if frames:
                curves_of[row.key] = pd.concat(
                    [_accuracy(f).groupby("round")["value"].mean().rename(i) * 100 for i, f in enumerate(frames)], axis=1
                ).sort_index()
        last = max(int(c.index.max()) for c in curves_of.values()) + 1
        for index, row in enumerate(report.recipe.rows):
            colour = _row_colour(index, len(report.recipe.rows))
            curves = curves_of.get(row.key)
            if curves is None:
                continue
            mean = curves.mean(axis=1)
            label = row.label
            if len(mean) == 1 and int(mean.index[0]) == 0:  # a method that does not train: one evaluation, drawn as a level
                ax.plot([1, last], [float(mean.iloc[0])] * 2, linestyle="--", linewidth=1.2, label=label, color=colour)
                continue
            ax.plot(mean.index + 1, mean.values, marker="o", markersize=3, label=label, color=colour)
            if curves.shape[1] > 1:
                ax.fill_between(mean.index + 1, curves.min(axis=1), curves.max(axis=1), color=colour, alpha=0.15)
        ax.set_title(spec.label)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("mean client accuracy (%)")
        ax.grid(alpha=0.3)
    # One legend for all panels, outside them: inside, ten or more methods
    # hide the curves. Rows keep table order; each appears once.
    legend: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    _suptitle(fig, f"{report.recipe.title}: accuracy per round (band: min-max over seeds)")
    fig.tight_layout()
    path = out / f"{report.recipe.stem}_rounds.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_clients(report: TableReport, out: Path) -> Path | None:
    """Last-round per-client accuracy per method (box over clients and seeds), one panel per dataset."""
    runs = _runs_by_cell(report)
    datasets = [d for d in report.recipe.datasets if any((d.key, r.key) in runs for r in report.recipe.rows)]
    if not datasets:
        return None
    plt = _pyplot()
    fig, axes = _grid(plt, len(datasets), width=max(5.0, 0.7 * len(report.recipe.rows) + 1.5))
    for ax, spec in zip(axes, datasets):
        data, labels = [], []
        for row in report.recipe.rows:
            frames = runs.get((spec.key, row.key))
            if not frames:
                continue
            values = []
            for frame in frames:
                acc = _accuracy(frame)
                values += list(acc[acc["round"] == acc["round"].max()]["value"] * 100)
            data.append(values)
            labels.append(row.label)
        ax.boxplot(data, showmeans=True, showfliers=False)  # every point is drawn below
        for i, values in enumerate(data, start=1):
            jitter = np.linspace(-0.12, 0.12, num=len(values)) if len(values) > 1 else [0.0]
            ax.scatter(np.full(len(values), i) + jitter, values, s=8, alpha=0.5, color="black", zorder=3)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(spec.label)
        ax.set_ylabel("client accuracy, last round (%)")
        ax.grid(alpha=0.3, axis="y")
    _suptitle(fig, f"{report.recipe.title}: last-round accuracy of every client (dots: clients x seeds)")
    fig.tight_layout()
    path = out / f"{report.recipe.stem}_clients.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def attention_matrix(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Client x expert mean attention over every round and seed where the client had that expert.

    Empty (NaN) where a client never used that expert.
    """
    parts = []
    for frame in frames:
        rows = frame[(frame["split"] == "test") & frame["metric"].str.match(_ATTENTION.pattern)]
        if not rows.empty:
            parts.append(rows.assign(expert=rows["metric"].str.extract(_ATTENTION.pattern, expand=False).astype(int)))
    if not parts:
        return pd.DataFrame()
    rows = pd.concat(parts)
    return rows.pivot_table(index="client_id", columns="expert", values="value", aggfunc="mean").sort_index().sort_index(axis=1)


def plot_attention(report: TableReport, out: Path) -> list[Path]:
    """One heatmap per (dataset, row) whose runs recorded attention weights (pFedMoAP)."""
    runs = _runs_by_cell(report)
    written = []
    for spec in report.recipe.datasets:
        for row in report.recipe.rows:
            frames = runs.get((spec.key, row.key))
            if not frames:
                continue
            matrix = attention_matrix(frames)
            if matrix.empty:
                continue
            plt = _pyplot()
            clients = sorted(set(matrix.index) | set(matrix.columns))
            matrix = matrix.reindex(index=clients, columns=clients)
            size = max(4.0, 0.35 * len(clients) + 2.0)
            fig, ax = plt.subplots(figsize=(size + 1.0, size))
            image = ax.imshow(np.ma.masked_invalid(matrix.to_numpy(dtype=float)), cmap="viridis", aspect="equal")
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="mean attention weight")
            step = max(1, len(clients) // 20)
            domains = _client_domains(frames)
            ticks = [f"{c} {domains[c]}" if c in domains else str(c) for c in clients]
            ax.set_xticks(range(0, len(clients), step), [str(c) for c in clients[::step]], fontsize=7)
            ax.set_yticks(range(0, len(clients), step), ticks[::step], fontsize=7)
            ax.set_xlabel("expert (the client whose prompt it is)")
            ax.set_ylabel("client")
            if domains:
                _domain_boundaries(ax, clients, domains)
            ax.set_title(
                textwrap.fill(f"{row.label} on {spec.label}: mean attention weight per expert", 75)
                + f"\n(over the rounds a client had that expert, {len(frames)} seed(s); diagonal: its own prompt)",
                fontsize=8,
            )
            fig.tight_layout()
            path = out / f"{report.recipe.stem}_attention_{spec.key}_{row.key}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def _client_domains(frames: list[pd.DataFrame]) -> dict[int, str]:
    first = frames[0]
    pairs = first[first["domain"] != ""][["client_id", "domain"]].drop_duplicates()
    return {int(c): str(d) for c, d in zip(pairs["client_id"], pairs["domain"])}


def _domain_boundaries(ax, clients: list[int], domains: dict[int, str]) -> None:
    """White lines between domain blocks (clients are domain-major)."""
    labels = [domains.get(c, "") for c in clients]
    for i in range(1, len(labels)):
        if labels[i] != labels[i - 1]:
            ax.axhline(i - 0.5, color="white", linewidth=1)
            ax.axvline(i - 0.5, color="white", linewidth=1)


def write_plots(report: TableReport, out: Path) -> list[Path]:
    """Every figure of the table that its finished runs allow; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [p for p in (plot_rounds(report, out), plot_clients(report, out)) if p is not None]
    return written + plot_attention(report, out)
