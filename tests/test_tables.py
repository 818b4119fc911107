"""Paper tables: recipes, statistics from fabricated metrics, markdown/CSV/LaTeX output, plots."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pandas as pd
import pytest

from conftest import one_line_error
from pfedmoap_cli.artifacts.metrics import MetricRow, append_metrics
from pfedmoap_cli.artifacts.partition import Partition, PartitionClient, save_partition
from pfedmoap_cli.engine.run_record import mark_round_complete
from pfedmoap_cli.engine.settings import default_run_id
from pfedmoap_cli.engine.workspace import RunPaths, Workspace
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.report import render
from pfedmoap_cli.report.cells import DONE, MISSING, PARTIAL, find_partitions
from pfedmoap_cli.report.table_recipes import AVG, available_tables, load_table_recipe
from pfedmoap_cli.report.tables import table_report

# ---- the shipped recipes -----------------------------------------------------

PAPER_TABLE1 = {  # PROTOCOL.md section 6, a few cells spread over the table
    ("zsclip", "flowers102"): (62.17, 0.12),
    ("coop", "food101"): (70.43, 2.42),
    ("fedotp", "dtd"): (87.64, 0.70),
    ("pfedmoap-lam0", "oxford_pets"): (94.83, 0.65),
    ("pfedmoap", "caltech101"): (97.95, 0.07),
    ("pfedmoap", "dtd"): (89.13, 0.54),
}


def test_shipped_tables_are_listed_and_load():
    assert {"1", "2", "3", "4", "demo"} <= set(available_tables())
    for name in available_tables():
        recipe = load_table_recipe(name)
        assert recipe.name == name
    assert load_table_recipe("table1").name == "1"


def test_baselines_table_runs_every_registered_method_under_both_splits():
    import pfedmoap_cli.methods  # noqa: F401  (registers every method)
    from pfedmoap_cli.methods.base import method_names

    recipe = load_table_recipe("baselines")
    assert {row.method for row in recipe.rows} == set(method_names())
    assert [(d.name, d.partition.scheme) for d in recipe.datasets] == [("synthetic", "pathological"), ("synthetic", "dirichlet")]
    assert len({d.key for d in recipe.datasets}) == 2
    assert recipe.seeds == (1, 2, 3)


def test_table1_recipe_follows_the_protocol():
    recipe = load_table_recipe("1")
    assert [d.name for d in recipe.datasets] == ["flowers102", "oxford_pets", "food101", "caltech101", "dtd"]
    methods = [r.method for r in recipe.rows]
    assert len(recipe.rows) == 11 and methods.count("pfedmoap") == 2
    assert set(methods) == {"zsclip", "coop", "promptfl", "promptfl-ft", "fedprox", "fedper", "fedamp", "pfedprompt", "fedotp", "pfedmoap"}
    assert recipe.seeds == (1, 2, 3)
    for spec in recipe.datasets:
        assert (spec.partition.scheme, spec.partition.clients, spec.partition.shots) == ("pathological", 10, 16)
        for row in recipe.rows:
            assert recipe.paper_value(row.key, recipe.columns(spec.name)[0]) is not None, (row.key, spec.name)
    for (row, dataset), (mean, std) in PAPER_TABLE1.items():
        value = recipe.paper_value(row, recipe.columns(dataset)[0])
        assert (value.mean, value.std) == (mean, std)
    lam0 = recipe.cell_settings("dtd", "pfedmoap-lam0", 2)
    assert lam0.method_options == {"lam": 0.0, "num_experts": 9} and lam0.seed == 2
    assert recipe.cell_settings("dtd", "pfedmoap", 1).method_options == {"num_experts": 9}
    from pfedmoap_cli.methods.pfedmoap import PFedMoAPOptions

    assert PFedMoAPOptions().lam == 0.5  # the "λ=0.5" rows rely on the default
    s = recipe.cell_settings("food101", "promptfl", 3)
    assert (s.rounds, s.frac, s.local_epochs, s.batch_size, s.backbone, s.pretrained) == (10, 1.0, 5, 16, "RN50", "openai")


def test_tables_2_3_4_settings_and_paper_values():
    t2, t3, t4 = (load_table_recipe(n) for n in ("2", "3", "4"))
    assert not t2.paper and t2.compare_paper  # shown as n/a, never invented
    s = t2.cell_settings("cifar100", "promptfl", 1)
    assert (s.rounds, s.frac) == (120, 0.1)
    assert t2.dataset("cifar10").partition.alpha == 0.5 and t2.dataset("cifar10").partition.clients == 100

    assert [c.key for c in t3.columns()] == ["clipart", "infograph", "painting", "quickdraw", "real", "sketch", AVG]
    s = t3.cell_settings("domainnet", "pfedmoap", 1)
    assert (s.rounds, s.frac, s.backbone, s.method_options["num_experts"]) == (25, 0.25, "ViT-B-16", 19)
    assert t3.dataset("domainnet").partition.clients_per_domain == 5
    col = {c.key: c for c in t3.columns()}
    assert t3.paper_value("pfedmoap", col["clipart"]).mean == 47.49
    assert t3.paper_value("zsclip", col[AVG]).mean == 9.81
    assert t3.paper_value("fedprox", col["sketch"]).mean == 22.49
    assert "defect 1" in t3.note and "chance" in t3.note

    col = {c.key: c for c in t4.columns()}
    assert [c.key for c in t4.columns()] == ["amazon", "caltech", "dslr", "webcam", AVG]
    assert t4.paper_value("coop", col["dslr"]).mean == 29.89 and t4.paper_value("pfedmoap", col[AVG]).mean == 38.31
    assert t4.cell_settings("office_caltech10", "promptfl", 1).frac == 0.5
    assert "defect 1" in t4.note


@pytest.mark.parametrize("table", ["1", "2", "3", "4"])
def test_plain_train_runs_are_table_cells(table):
    """`pfedmoap train --method M --seed S` on the dataset recipe's partition gives the cell's run id."""
    from pfedmoap_cli.cli.train_cmd import resolve_settings
    from pfedmoap_cli.engine.settings import run_fingerprint

    recipe = load_table_recipe(table)
    for spec in recipe.datasets:
        for row in ("promptfl", "pfedmoap"):
            ours = recipe.cell_settings(spec.name, row, 2)
            plain = resolve_settings(spec.name, None, {"method": recipe.row(row).method, "seed": 2})
            assert run_fingerprint(ours, "p") == run_fingerprint(plain, "p"), (table, spec.name, row)


# ---- recipe validation -------------------------------------------------------

BASE = """
[table]
title = "T"
seeds = [1, 2]
[[datasets]]
name = "fake"
partition = {{ scheme = "iid", clients = 4 }}
[[rows]]
key = "a"
method = "promptfl"
{extra}
"""


@pytest.mark.parametrize(
    "extra, message",
    [
        ("[oops]\nx = 1", "unknown key(s) oops"),
        ("[[rows]]\nkey = \"a\"\nmethod = \"coop\"", "row key a is used twice"),
        ("[paper]\nnope = { fake = 1.0 }", "names row 'nope'"),
        ("[paper]\na = { other = 1.0 }", "names dataset 'other'"),
        ("[paper]\na = { fake = [1.0, 2.0, 3.0] }", "[mean, std]"),
        ("[train]\nroundz = 3", "unknown setting 'roundz'"),
        ("[train]\nfrac = 2.0", "--frac"),
        ("[train]\nmethod_options = { lam = 0.0 }", "belong to [[rows]]"),
    ],
)
def test_bad_recipes_are_one_line_config_errors(tmp_path, extra, message):
    path = tmp_path / "bad.toml"
    path.write_text(BASE.format(extra=extra))
    with pytest.raises(ConfigError) as error:
        load_table_recipe(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "line, partition_seed, mode",
    [
        ("", None, "partitions: one per seed (partition seed = run seed)"),  # the default
        ('partition_seed = "run"', None, "partitions: one per seed (partition seed = run seed)"),
        ("partition_seed = 7", 7, "partitions: fixed, seed 7"),
        ("partition_seed = 0", 0, "partitions: fixed, seed 0"),  # 0 is a seed like any other
    ],
)
def test_partition_seed_follows_the_run_seed_unless_fixed(tmp_path, line, partition_seed, mode):
    path = tmp_path / "t.toml"
    path.write_text(BASE.format(extra="").replace("seeds = [1, 2]", f"seeds = [1, 2]\n{line}"))
    recipe = load_table_recipe(str(path))
    assert recipe.partition_seed == partition_seed and recipe.partition_mode() == mode
    if partition_seed is None:
        assert [recipe.partition_seed_for(s) for s in (1, 2)] == [1, 2] and recipe.partition_seeds() == (1, 2)
    else:
        assert [recipe.partition_seed_for(s) for s in (1, 2)] == [partition_seed] * 2 and recipe.partition_seeds() == (partition_seed,)


@pytest.mark.parametrize("value", ['"per-seed"', "-1", "1.5", "true", "[1, 2]"])
def test_a_bad_partition_seed_is_a_one_line_error_naming_both_forms(tmp_path, value):
    path = tmp_path / "t.toml"
    path.write_text(BASE.format(extra="").replace("seeds = [1, 2]", f"seeds = [1, 2]\npartition_seed = {value}"))
    with pytest.raises(ConfigError) as error:
        load_table_recipe(str(path))
    message = str(error.value)
    assert "[table] partition_seed must be \"run\"" in message and "an integer >= 0" in message and "fix the file" in message
    assert "\n" not in message


def test_domain_table_needs_consistent_domains(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        '[table]\ntitle = "T"\nseeds = [1]\ncolumns = "domains"\n'
        '[[datasets]]\nname = "fake"\ndomains = ["x", "y"]\npartition = { scheme = "iid", clients = 5, clients_per_domain = 2 }\n'
        '[[rows]]\nmethod = "coop"\n'
    )
    with pytest.raises(ConfigError, match="2 domains x 2 clients per domain = 4"):
        load_table_recipe(str(path))


def test_unknown_table_lists_the_tables(cli):
    message = one_line_error(cli("report", "--table", "9"))
    assert "unknown table '9'" in message and "1, 2, 3, 4, demo" in message


# ---- fabricated workspaces -----------------------------------------------------

LABEL_TABLE = """
[table]
title = "Fake label-shift table"
seeds = [1, 2, 3]
partition_seed = 7
[train]
rounds = 2
backbone = "tiny-vit"
pretrained = "none"
[[datasets]]
name = "fake_a"
label = "Fake A"
partition = { scheme = "iid", clients = 2 }
[[datasets]]
name = "fake_b"
label = "Fake_B & co"
partition = { scheme = "iid", clients = 2 }
[[rows]]
key = "zsclip"
label = "ZS-CLIP"
method = "zsclip"
train = { rounds = 1 }
[[rows]]
key = "moap"
label = "pFedMoAP (λ=0)"
method = "pfedmoap"
train = { method_options = { lam = 0.0 } }
[paper]
zsclip = { fake_a = [50.0, 1.0], fake_b = 40.0 }
moap = { fake_a = [70.5, 0.25] }
"""


def fake_partition(dataset: str, clients: int, seed: int, domains: list[str] | None = None, per_domain: int | None = None) -> Partition:
    params = {"num_clients": clients, "seed": seed}
    if per_domain is not None:
        params["clients_per_domain"] = per_domain
    return Partition(
        dataset=dataset,
        dataset_options={},
        dataset_fingerprint="f" * 64,
        class_names=("a", "b"),
        scheme="domain-iid" if per_domain else "iid",
        params=params,
        clients=tuple(
            PartitionClient(i, (2 * i, 2 * i + 1), (i,), domain=domains[i] if domains else None) for i in range(clients)
        ),
    )


def fabricate_run(ws, recipe, partitions, dataset, row, seed, accuracies, completed=None, attention=None, domains=None):
    """Write run.json, metrics.csv and progress.json of one cell at its expected run id.

    ``accuracies[r][c]`` is client c's accuracy in round r (0-1).
    """
    settings = recipe.cell_settings(dataset, row, seed)
    choice = partitions[(dataset, recipe.partition_seed_for(seed))]
    run_id = default_run_id(settings, dataset, choice.sha256)
    paths = RunPaths(ws.run_dir(run_id))
    paths.root.mkdir(parents=True)
    paths.run_json.write_text(json.dumps({"schema": "pfedmoap.run/1", "run_id": run_id}))
    rows = []
    for r, per_client in enumerate(accuracies):
        for c, acc in enumerate(per_client):
            common = dict(
                run_id=run_id, method=settings.method, dataset=dataset, partition_sha256=choice.sha256, seed=seed, round=r,
                client_id=c, domain=domains[c] if domains else "", split="test", num_examples=10 + c,
            )
            rows.append(MetricRow(metric="accuracy", value=acc, **common))
            rows.append(MetricRow(metric="loss", value=1.0, **common))
            for expert, weight in (attention or {}).get((r, c), {}).items():
                rows.append(MetricRow(metric=f"attention_c{expert:04d}", value=weight, **common))
    append_metrics(paths.metrics_csv, rows)
    mark_round_complete(paths, len(accuracies) if completed is None else completed, settings.rounds)
    return run_id


@pytest.fixture
def label_ws(tmp_path):
    path = tmp_path / "fake_label.toml"
    path.write_text(LABEL_TABLE)
    recipe = load_table_recipe(str(path))
    ws = Workspace(tmp_path / "ws")
    for name in ("fake_a", "fake_b"):
        save_partition(fake_partition(name, 2, 7), ws.partitions_dir, make_current=False)
    save_partition(fake_partition("fake_a", 2, 8), ws.partitions_dir, make_current=False)  # another seed: not this table's
    partitions = find_partitions(ws, recipe)
    assert all(p is not None and not p.note for p in partitions.values())
    # fake_a / moap: seeds give 50, 60, 70 in the LAST round (round 0 is a decoy) -> 60 +- 10
    for seed, (c0, c1) in zip((1, 2, 3), [(0.4, 0.6), (0.5, 0.7), (0.6, 0.8)]):
        fabricate_run(ws, recipe, partitions, "fake_a", "moap", seed, [[0.99, 0.99], [c0, c1]])
    # fake_a / zsclip: three one-round runs, 30, 30, 33 -> mean 31, std sqrt(3)
    for seed, acc in zip((1, 2, 3), (0.3, 0.3, 0.33)):
        fabricate_run(ws, recipe, partitions, "fake_a", "zsclip", seed, [[acc, acc]])
    # fake_b / zsclip: seed 2 missing, seed 3 interrupted after 0 of 1 rounds
    fabricate_run(ws, recipe, partitions, "fake_b", "zsclip", 1, [[0.1, 0.2]])
    fabricate_run(ws, recipe, partitions, "fake_b", "zsclip", 3, [[0.9, 0.9]], completed=0)
    # fake_b / moap: two seeds finished, one interrupted half-way
    fabricate_run(ws, recipe, partitions, "fake_b", "moap", 1, [[0.5, 0.5], [0.6, 0.6]])
    fabricate_run(ws, recipe, partitions, "fake_b", "moap", 2, [[0.5, 0.5], [0.6, 0.6]])
    fabricate_run(ws, recipe, partitions, "fake_b", "moap", 3, [[0.5, 0.5], [0.6, 0.6]], completed=1)
    return ws, recipe


def test_cell_statistics_are_exact(label_ws):
    ws, recipe = label_ws
    report = table_report(ws, recipe)
    col = {c.dataset: c for c in recipe.columns()}
    moap_a = report.cell("moap", col["fake_a"])
    assert moap_a.complete and moap_a.values == pytest.approx((50.0, 60.0, 70.0))
    assert moap_a.mean == pytest.approx(60.0) and moap_a.std == pytest.approx(10.0)  # ddof=1
    assert moap_a.paper.mean == 70.5 and moap_a.diff == pytest.approx(-10.5)
    zs_a = report.cell("zsclip", col["fake_a"])
    assert zs_a.mean == pytest.approx(31.0) and zs_a.std == pytest.approx(np.std([30, 30, 33], ddof=1))
    assert zs_a.diff == pytest.approx(-19.0)

    zs_b = report.cell("zsclip", col["fake_b"])
    assert not zs_b.complete and zs_b.mean is None and zs_b.std is None and zs_b.diff is None
    assert zs_b.seeds_done == (1,) and zs_b.seeds_missing == (2, 3) and zs_b.seeds_partial == (3,)
    assert zs_b.missing_text() == "missing 2/3 seeds (1 partial)"
    assert zs_b.paper.mean == 40.0 and zs_b.paper.std is None
    moap_b = report.cell("moap", col["fake_b"])
    assert moap_b.seeds_missing == (3,) and moap_b.missing_text() == "missing 1/3 seeds (1 partial)"
    assert moap_b.paper is None
    states = {(r.dataset, r.row, r.seed): r.status for r in report.runs}
    assert states[("fake_b", "zsclip", 2)] == MISSING and states[("fake_b", "zsclip", 3)] == PARTIAL
    assert states[("fake_a", "moap", 1)] == DONE
    assert report.complete_cells == 2


def test_markdown_and_csv_put_values_in_the_right_cells(label_ws):
    ws, recipe = label_ws
    report = table_report(ws, recipe)
    markdown = render.to_markdown(report)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in markdown.splitlines() if line.startswith("| ")}
    assert lines["Method"] == "| Method | Fake A | paper | Δ | Fake_B & co | paper | Δ |"
    cells = [c.strip() for c in lines["pFedMoAP (λ=0)"].strip("|").split("|")]
    assert cells == ["pFedMoAP (λ=0)", "**60.00 ± 10.00**", "70.50 ± 0.25", "-10.50", "missing 1/3 seeds (1 partial)", "n/a", "n/a"]
    cells = [c.strip() for c in lines["ZS-CLIP"].strip("|").split("|")]
    assert cells == ["ZS-CLIP", "31.00 ± 1.73", "50.00 ± 1.00", "-19.00", "missing 2/3 seeds (1 partial)", "40.00", "-"]
    assert "ddof=1" in markdown and "2/4 cells complete" in markdown
    assert "\npartitions: fixed, seed 7.\n" in markdown  # the recipe's partition_seed = 7
    assert "- fake_a: partition " in markdown

    frame = pd.read_csv(io.StringIO(render.to_csv(report)), keep_default_na=False)
    assert len(frame) == 4
    moap_a = frame[(frame.row == "moap") & (frame.dataset == "fake_a")].iloc[0]
    assert float(moap_a.ours_mean) == pytest.approx(60.0) and float(moap_a.ours_std) == pytest.approx(10.0)
    assert float(moap_a.paper_mean) == 70.5 and float(moap_a.paper_std) == 0.25 and float(moap_a["diff"]) == pytest.approx(-10.5)
    assert moap_a.seeds_done == "1 2 3" and len(moap_a.run_ids.split()) == 3
    zs_b = frame[(frame.row == "zsclip") & (frame.dataset == "fake_b")].iloc[0]
    assert zs_b.ours_mean == "" and zs_b.seeds_missing == "2 3" and str(zs_b.seeds_partial) == "3" and float(zs_b.paper_mean) == 40.0
    assert set(frame.partitions) == {"partitions: fixed, seed 7"}


def check_latex(tex: str, rows: int, columns: int) -> None:
    """A well-formed booktabs tabular: balanced braces and environments, rules in order, one line per row."""
    body = re.sub(r"\\[{}%&$#_]", "", tex)  # escaped characters are not delimiters
    body = "\n".join(line for line in body.splitlines() if not line.startswith("%"))
    depth = 0
    for char in body:
        depth += {"{": 1, "}": -1}.get(char, 0)
        assert depth >= 0
    assert depth == 0
    assert body.count("$") % 2 == 0
    lines = body.splitlines()
    assert lines[0].startswith("\\begin{tabular}{") and lines[-1] == "\\end{tabular}"
    spec = re.match(r"\\begin\{tabular\}\{([lrc]+)\}", lines[0]).group(1)
    assert len(spec) == columns
    positions = [lines.index(rule) for rule in ("\\toprule", "\\midrule", "\\bottomrule")]
    assert positions == sorted(positions) and all(body.count(rule) == 1 for rule in ("\\toprule", "\\midrule", "\\bottomrule"))
    table_rows = lines[positions[1] + 1 : positions[2]]
    assert len(table_rows) == rows
    for line in table_rows:
        assert line.endswith("\\\\") and line.count("&") == columns - 1


def test_latex_is_a_well_formed_tabular(label_ws):
    ws, recipe = label_ws
    tex = render.to_latex(table_report(ws, recipe))
    check_latex(tex, rows=2, columns=1 + 2 * 3)
    assert "Fake\\_B \\& co" in tex and "pFedMoAP ($\\lambda$=0)" in tex
    assert "$\\mathbf{60.00 \\pm 10.00}$ & $70.50 \\pm 0.25$ & $-10.50$" in tex


def test_shipped_tables_render_well_formed_latex_on_an_empty_workspace(tmp_path):
    ws = Workspace(tmp_path / "ws")
    for name in available_tables():
        recipe = load_table_recipe(name)
        report = table_report(ws, recipe)
        per = 3 if recipe.compare_paper else 1
        check_latex(render.to_latex(report), rows=len(recipe.rows), columns=1 + per * len(recipe.columns()))


DOMAIN_TABLE = """
[table]
title = "Fake domain table"
seeds = [1, 2]
columns = "domains"
note = "why the paper is near chance"
[train]
rounds = 2
[[datasets]]
name = "fake_d"
domains = ["x", "y"]
partition = { scheme = "iid", clients = 4, clients_per_domain = 2 }
[[rows]]
key = "pfedmoap"
method = "pfedmoap"
[paper.pfedmoap.fake_d]
x = 10.0
avg = 20.0
"""


def test_per_domain_columns(tmp_path):
    path = tmp_path / "fake_domain.toml"
    path.write_text(DOMAIN_TABLE)
    recipe = load_table_recipe(str(path))
    ws = Workspace(tmp_path / "ws")
    domains = ["x", "x", "y", "y"]
    for seed in (1, 2):  # no partition_seed: each seed has its own partition
        save_partition(fake_partition("fake_d", 4, seed, domains, per_domain=2), ws.partitions_dir, make_current=False)
    partitions = find_partitions(ws, recipe)
    assert set(partitions) == {("fake_d", 1), ("fake_d", 2)} and partitions[("fake_d", 1)].sha256 != partitions[("fake_d", 2)].sha256
    attention = {(1, 0): {0: 0.7, 1: 0.3}, (1, 1): {1: 0.6, 0: 0.4}, (0, 0): {0: 0.5, 1: 0.5}}
    fabricate_run(ws, recipe, partitions, "fake_d", "pfedmoap", 1, [[0, 0, 0, 0], [0.2, 0.4, 0.6, 1.0]], attention=attention, domains=domains)
    fabricate_run(ws, recipe, partitions, "fake_d", "pfedmoap", 2, [[0, 0, 0, 0], [0.4, 0.4, 0.6, 0.6]], domains=domains)
    report = table_report(ws, recipe)
    col = {c.key: c for c in recipe.columns()}
    x, y, avg = (report.cell("pfedmoap", col[k]) for k in ("x", "y", AVG))
    assert x.values == pytest.approx((30.0, 40.0)) and x.mean == pytest.approx(35.0) and x.diff == pytest.approx(25.0)
    assert y.values == pytest.approx((80.0, 60.0)) and y.std == pytest.approx(np.std([80, 60], ddof=1)) and y.paper is None
    assert avg.values == pytest.approx((55.0, 50.0)) and avg.diff == pytest.approx(32.5)
    markdown = render.to_markdown(report)
    assert "| Method | x | paper | Δ | y | paper | Δ | Avg | paper | Δ |" in markdown
    assert "**Note.** why the paper is near chance" in markdown
    assert "partitions: one per seed (partition seed = run seed)." in markdown
    assert "- fake_d seed 2: partition " in markdown
    assert "% partitions: one per seed (partition seed = run seed)" in render.to_latex(report)
    check_latex(render.to_latex(report), rows=1, columns=1 + 3 * 3)

    from pfedmoap_cli.report.plots import attention_matrix

    matrix = attention_matrix([report.metrics[rid] for rid in x.run_ids])
    assert matrix.loc[0, 0] == pytest.approx(0.6) and matrix.loc[0, 1] == pytest.approx(0.4)  # mean over rounds 0 and 1
    assert matrix.loc[1, 1] == pytest.approx(0.6) and matrix.loc[1, 0] == pytest.approx(0.4)


def test_report_cli_writes_files_and_plots(tmp_path, cli, label_ws):
    pytest.importorskip("matplotlib")
    ws, recipe = label_ws
    result = cli("report", "--table", str(recipe.path), workspace=ws.root)
    assert result.exit_code == 0, result.stderr
    assert "60.00 ± 10.00" in result.stdout
    for suffix in (".md", ".csv", ".tex"):
        assert (ws.reports_dir / f"fake_label{suffix}").is_file()
    assert (ws.reports_dir / "fake_label_rounds.png").stat().st_size > 1000
    assert (ws.reports_dir / "fake_label_clients.png").stat().st_size > 1000


def test_report_without_matplotlib_says_how_to_get_plots(cli, label_ws, monkeypatch):
    from pfedmoap_cli.report import plots

    monkeypatch.setattr(plots, "plots_available", lambda: False)
    ws, recipe = label_ws
    result = cli("report", "--table", str(recipe.path), workspace=ws.root)
    assert result.exit_code == 0 and "pip install 'pfedmoap[plots]'" in result.stdout


def test_table1_on_an_empty_workspace_shows_the_paper_and_every_cell_missing(cli, tmp_path):
    result = cli("report", "--table", "1")
    assert result.exit_code == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
    assert len(rows) == 11
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1::3] == ["missing 3/3 seeds"] * 5
    assert "| pFedMoAP (λ=0.5) | missing 3/3 seeds | 98.41 ± 0.04 | - |" in result.stdout
    assert "0/55 cells complete" in result.stdout
    reports = tmp_path / "ws" / "reports"
    assert {p.name for p in reports.iterdir()} >= {"table1.md", "table1.csv", "table1.tex"}
    frame = pd.read_csv(reports / "table1.csv")
    assert len(frame) == 55 and frame["ours_mean"].isna().all() and frame["paper_mean"].notna().all()
    pets = frame[(frame.row == "pfedmoap-lam0") & (frame.dataset == "oxford_pets")].iloc[0]
    assert (pets.paper_mean, pets.paper_std) == (94.83, 0.65)


def test_tables_3_and_4_explain_the_near_chance_paper_numbers(cli):
    for table in ("3", "4"):
        result = cli("report", "--table", table, "--no-plots")
        assert result.exit_code == 0, result.stderr
        assert "near chance" in result.stdout and "defect 1" in result.stdout


def test_report_without_table_keeps_the_run_summary(cli):
    result = cli("report")
    assert result.exit_code == 0 and "no finished rounds" in result.stdout
