"""A built paper table as markdown, a long-format CSV and a LaTeX tabular."""

from __future__ import annotations

import csv
import io

from pfedmoap_cli.report.table_recipes import Column, PaperValue
from pfedmoap_cli.report.tables import STD_DDOF, CellStat, TableReport

DIGITS = 2

CSV_COLUMNS = [
    "table", "row", "label", "method", "dataset", "column",
    "ours_mean", "ours_std", "seeds_expected", "seeds_done", "seeds_missing", "seeds_partial",
    "paper_mean", "paper_std", "diff", "values", "run_ids", "partitions",
]


def _num(value: float) -> str:
    return f"{value:.{DIGITS}f}"


def _pm(mean: float, std: float | None, pm: str) -> str:
    return _num(mean) if std is None else f"{_num(mean)}{pm}{_num(std)}"


def _paper(value: PaperValue | None, pm: str) -> str:
    return "n/a" if value is None else _pm(value.mean, value.std, pm)


def _diff(cell: CellStat) -> str:
    diff = cell.diff
    if diff is None:
        return "n/a" if cell.paper is None else "-"
    return f"{diff:+.{DIGITS}f}"


def _has_paper(report: TableReport) -> bool:
    return report.recipe.compare_paper


#: What a cell prints when its column does not apply to its row (no novel rows); the footnote says why.
NOT_APPLICABLE = "n/a"


def _column_label(report: TableReport, column: Column) -> str:
    if report.recipe.generalisation or (report.recipe.per_domain and len(report.recipe.datasets) > 1):
        return f"{report.recipe.dataset(column.dataset).label} {column.label}"
    return column.label


def stats_note(report: TableReport) -> str:
    seeds = ", ".join(str(s) for s in report.recipe.seeds)
    if report.recipe.generalisation:
        text = (
            f"ours: mean ± sample std (ddof={STD_DDOF}) over seeds {seeds} of each run's last-round values (%), finished runs only: "
            "Local = mean over clients of each client's accuracy on its own (base) classes' test images; "
            "Base = mean over clients of the accuracy over all base classes' test images (base-way classifier); "
            "Novel = the same over the novel classes (novel-way classifier); "
            "HM = 2·Base·Novel/(Base+Novel), the two-way harmonic mean (CoCoOp's, the default); "
            "HM3 = 3/(1/Local+1/Base+1/Novel), the three-way harmonic mean (FedTPG's); both computed per run, then averaged"
        )
    else:
        text = (
            f"ours: mean ± sample std (ddof={STD_DDOF}) over seeds {seeds} of each run's last-round mean client test accuracy (%), "
            "finished runs only"
        )
    if _has_paper(report):
        text += "; paper: as reported; Δ = ours − paper (points)"
    return text + "; bold: our best per column."


def partition_lines(report: TableReport) -> list[str]:
    """One line per partition of the table: per dataset entry, and per seed when each seed has its own."""
    recipe = report.recipe
    lines = []
    for spec in recipe.datasets:
        for seed in recipe.partition_seeds():
            name = f"{spec.key} seed {seed}" if recipe.per_seed_partitions else spec.key
            choice = report.partitions.get((spec.key, seed))
            if choice is None:
                lines.append(f"{name}: no partition yet (the sweep creates it)")
            else:
                lines.append(f"{name}: partition {choice.path.name} (sha256 {choice.sha256[:12]})" + (f"; {choice.note}" if choice.note else ""))
    return lines


def not_applicable_lines(report: TableReport) -> list[str]:
    """The footnote of the "n/a" cells: which rows, which columns, and why."""
    recipe = report.recipe
    lines = []
    for row in recipe.rows:
        columns = [c for c in recipe.columns() if report.cell(row.key, c).not_applicable]
        if not columns:
            continue
        names = ", ".join(dict.fromkeys(c.label for c in columns))
        datasets = ", ".join(dict.fromkeys(recipe.dataset(c.dataset).label for c in columns))
        lines.append(
            f"{NOT_APPLICABLE}: {row.label} ({names}; {datasets}): its finished runs record no novel-class accuracy "
            f"({_why_no_novel(row.method)}), so Novel and the harmonic means do not exist for it"
        )
    return lines


def _why_no_novel(method: str) -> str:
    """Why a method's runs have no novel-class scores, as its registration says (``label_set_free``)."""
    from pfedmoap_cli.errors import UserError
    from pfedmoap_cli.methods.base import get_method

    try:
        free = getattr(get_method(method), "label_set_free", True)
    except UserError:
        return f"method {method} is not available in this version to say why"
    if not free:
        return f"{method}'s state is tied to the classes it trained on, so it cannot score new class names"
    return f"{method} scores new class names, but these runs wrote no novel rows: they may predate base-to-novel scoring"


def _progress_lines(report: TableReport) -> list[str]:
    recipe = report.recipe
    # Cells that do not apply to their row (no novel rows) have nothing left to run.
    not_applicable = sum(c.not_applicable for c in report.cells.values())
    total = len(report.cells) - not_applicable
    lines = [f"{report.complete_cells}/{total} cells complete" + (f" ({not_applicable} not applicable)." if not_applicable else ".")]
    if report.complete_cells < total:
        lines[0] += f" Fill the rest with 'pfedmoap sweep --table {recipe.name}' ('--dry-run' lists them)."
    return lines + partition_lines(report)


def to_markdown(report: TableReport) -> str:
    """The table as GitHub markdown, with the notes that belong next to it."""
    recipe = report.recipe
    paper = _has_paper(report)
    columns = recipe.columns()
    header = ["Method"]
    for column in columns:
        header += [_column_label(report, column)] + (["paper", "Δ"] if paper else [])
    lines = [f"## {recipe.title}", ""]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "|".join("---:" for _ in header[1:]) + "|"]
    best = {column: report.best(column) for column in columns}
    for row in recipe.rows:
        cells = [row.label]
        for column in columns:
            cell = report.cell(row.key, column)
            if cell.complete:
                ours = _pm(cell.mean, cell.std, " ± ")
                cells.append(f"**{ours}**" if row.key in best[column] else ours)
            elif cell.not_applicable:
                cells.append(NOT_APPLICABLE)
            else:
                cells.append(cell.missing_text())
            if paper:
                cells += [_paper(cell.paper, " ± "), _diff(cell)]
        lines.append("| " + " | ".join(cells) + " |")
    if recipe.note:
        lines += ["", f"**Note.** {recipe.note}"]
    # Whether the std includes the partition's variance depends on this, so it is stated with the numbers.
    lines += ["", stats_note(report)]
    for line in not_applicable_lines(report):
        lines += ["", f"{line}."]
    lines += ["", f"{recipe.partition_mode()}."]
    lines += [""] + [f"- {line}" for line in _progress_lines(report)]
    return "\n".join(lines) + "\n"


def to_csv(report: TableReport) -> str:
    """One line per (row, column): our statistic, the seeds behind it, the paper's value and the difference."""
    recipe = report.recipe
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def opt(value: float | None) -> str:
        return "" if value is None else repr(float(value))

    for row in recipe.rows:
        for column in recipe.columns():
            cell = report.cell(row.key, column)
            writer.writerow(
                [
                    recipe.name, row.key, row.label, row.method, column.dataset, column.key,
                    opt(cell.mean), opt(cell.std), cell.seeds_expected,
                    " ".join(map(str, cell.seeds_done)), " ".join(map(str, cell.seeds_missing)), " ".join(map(str, cell.seeds_partial)),
                    opt(cell.paper.mean if cell.paper else None), opt(cell.paper.std if cell.paper else None), opt(cell.diff),
                    " ".join(repr(v) for v in cell.values), " ".join(cell.run_ids), recipe.partition_mode(),
                ]
            )
    return buffer.getvalue()


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}
_TEX_PM = r" \pm "
_LATEX_UNICODE = {"λ": r"$\lambda$", "±": r"$\pm$", "Δ": r"$\Delta$", "−": "-", "α": r"$\alpha$"}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters and spell the Greek letters the labels use."""
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    for char, replacement in _LATEX_UNICODE.items():
        out = out.replace(char, replacement)
    return out


def to_latex(report: TableReport) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``): ours, the paper's and Δ per column."""
    recipe = report.recipe
    paper = _has_paper(report)
    columns = recipe.columns()
    per = 3 if paper else 1
    lines = [
        f"% {latex_escape(recipe.title)}",
        f"% generated by 'pfedmoap report --table {latex_escape(recipe.name)}'; needs \\usepackage{{booktabs}}",
        f"% {latex_escape(stats_note(report))}",
        f"% {latex_escape(recipe.partition_mode())}",
    ]
    if recipe.note:
        lines.append(f"% Note: {latex_escape(recipe.note)}")
    lines += [f"% {latex_escape(line)}" for line in not_applicable_lines(report)]
    lines.append("\\begin{tabular}{l" + "r" * (per * len(columns)) + "}")
    lines.append("\\toprule")
    if paper:
        groups = " & ".join(f"\\multicolumn{{3}}{{c}}{{{latex_escape(_column_label(report, c))}}}" for c in columns)
        lines.append(f" & {groups} \\\\")
        lines.append(" ".join(f"\\cmidrule(lr){{{2 + 3 * i}-{4 + 3 * i}}}" for i in range(len(columns))))
        lines.append("Method & " + " & ".join("Ours & Paper & $\\Delta$" for _ in columns) + " \\\\")
    else:
        lines.append("Method & " + " & ".join(latex_escape(_column_label(report, c)) for c in columns) + " \\\\")
    lines.append("\\midrule")
    best = {column: report.best(column) for column in columns}
    for row in recipe.rows:
        cells = [latex_escape(row.label)]
        for column in columns:
            cell = report.cell(row.key, column)
            if cell.complete:
                ours = _pm(cell.mean, cell.std, _TEX_PM)
                cells.append(f"$\\mathbf{{{ours}}}$" if row.key in best[column] else f"${ours}$")
            elif cell.not_applicable:
                cells.append(NOT_APPLICABLE)
            else:
                cells.append(f"\\textit{{{latex_escape(cell.missing_text())}}}")
            if paper:
                cells.append("n/a" if cell.paper is None else f"${_pm(cell.paper.mean, cell.paper.std, _TEX_PM)}$")
                diff = _diff(cell)
                cells.append(f"${diff}$" if diff not in {"n/a", "-"} else ("n/a" if diff == "n/a" else "--"))
        lines.append(" & ".join(cells) + " \\\\")
    lines.append("\\bottomrule")
    lines.append("\\end{tabular}")
    return "\n".join(lines) + "\n"
