"""Base-to-novel tables (PROTOCOL-MORE.md section 6): the recipes, the partition option, and the cells.

Expected values are written out here from the protocol (datasets, zero-shot
reference figures, the harmonic means) or computed plainly from the
metrics rows the test itself writes, never read back from the code.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import pfedmoap_cli.methods  # noqa: F401  (registers every method)
from conftest import one_line_error
from pfedmoap_cli.artifacts.partition import Partition, PartitionClient, save_partition
from pfedmoap_cli.data.recipes_schema import check_recipe
from pfedmoap_cli.engine.run_record import mark_round_complete
from pfedmoap_cli.engine.settings import default_run_id
from pfedmoap_cli.engine.workspace import RunPaths, Workspace
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.base import method_names
from pfedmoap_cli.report import render
from pfedmoap_cli.report.cells import find_partitions
from pfedmoap_cli.report.sweep import build_partitions
from pfedmoap_cli.report.table_recipes import load_table_recipe
from pfedmoap_cli.report.tables import table_report

SCRIPT = Path(sys.executable).with_name("pfedmoap")

#: PROTOCOL-MORE.md section 6: zero-shot CLIP ViT-B/16 on the base-to-novel split (CoCoOp's table), base / novel %.
ZERO_SHOT = {
    "caltech101": (96.84, 94.00),
    "oxford_pets": (91.17, 97.26),
    "flowers102": (72.08, 77.80),
    "food101": (90.10, 91.22),
    "dtd": (53.24, 59.90),
}
COLUMN_KEYS = ["local", "base", "novel", "hm", "hm3"]


# ---- the shipped recipes ----------------------------------------------------------


def test_generalisation_recipe_follows_the_protocol():
    recipe = load_table_recipe("generalisation")
    assert recipe.name == "generalisation" and recipe.generalisation and recipe.compare_paper
    assert sorted(d.name for d in recipe.datasets) == sorted(ZERO_SHOT)  # Table 1's five datasets
    assert recipe.seeds == (1, 2, 3) and recipe.per_seed_partitions
    for spec in recipe.datasets:
        part = spec.partition
        assert (part.scheme, part.clients, part.shots, part.base_to_novel) == ("pathological", 10, 16, True), spec.key
        assert dict(part.dataset_options) == {"split": "coop"}
        settings = part.settings(2)
        assert settings.base_to_novel is True and settings.seed == 2
        assert [c.key for c in recipe.columns(spec.key)] == COLUMN_KEYS
        for row in recipe.rows:
            cell = recipe.cell_settings(spec.key, row.key, 1)
            assert (cell.backbone, cell.pretrained) == ("ViT-B-16", "openai"), (spec.key, row.key)
        # the zero-shot checks are the ZS-CLIP row's reference values, in Base and Novel only
        column = {c.key: c for c in recipe.columns(spec.key)}
        base, novel = ZERO_SHOT[spec.name]
        assert recipe.paper_value("zsclip", column["base"]).mean == base
        assert recipe.paper_value("zsclip", column["novel"]).mean == novel
        assert recipe.paper_value("zsclip", column["local"]) is None and recipe.paper_value("zsclip", column["hm"]) is None
    assert {row for row, _, _ in recipe.paper} == {"zsclip"} and len(recipe.paper) == 2 * len(ZERO_SHOT)


def test_synthetic_generalisation_recipe_runs_on_the_micro_clip():
    recipe = load_table_recipe("generalisation_synthetic")
    assert recipe.generalisation and not recipe.compare_paper and not recipe.paper
    assert recipe.seeds == (1, 2, 3) and recipe.partition_seed == 1
    (spec,) = recipe.datasets
    assert spec.name == "synthetic"
    assert (spec.partition.scheme, spec.partition.clients, spec.partition.shots, spec.partition.base_to_novel) == ("pathological", 6, 16, True)
    for row in recipe.rows:
        s = recipe.cell_settings(spec.key, row.key, 3)
        assert (s.backbone, s.pretrained, s.seed) == ("micro-clip", "synthetic", 3)
        if row.method not in {"zsclip", "coop"}:
            assert (s.rounds, s.local_epochs, s.frac) == (5, 2, 1.0), row.key


@pytest.mark.parametrize("table", ["generalisation", "generalisation_synthetic"])
def test_every_registered_method_has_a_row(table):
    recipe = load_table_recipe(table)
    assert {row.method for row in recipe.rows} == set(method_names())
    assert len({row.key for row in recipe.rows}) == len(recipe.rows)


@pytest.mark.parametrize("table, runs", [("generalisation_synthetic", 16 * 1 * 3), ("generalisation", 16 * 5 * 3)])
def test_sweep_dry_run_lists_every_run(cli, tmp_path, table, runs):
    result = cli("sweep", "--table", table, "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert f"{runs} runs: 0 done, 0 partial, {runs} missing" in result.stdout
    recipe = load_table_recipe(table)
    listed = [line.split() for line in result.stdout.splitlines() if line.startswith("missing ")]
    assert len(listed) == runs
    assert {(words[1], words[2], int(words[3])) for words in listed} == {
        (d.key, r.key, s) for d in recipe.datasets for r in recipe.rows for s in recipe.seeds
    }
    assert not (tmp_path / "ws" / "partitions").exists()  # a dry run writes nothing


def test_sweep_builds_the_base_to_novel_partition_and_finds_it_again(tmp_path):
    """The synthetic recipe's partition through the real builder: 6 clients x 3 of the 18 base classes."""
    recipe = load_table_recipe("generalisation_synthetic")
    ws = Workspace(tmp_path / "ws")
    (spec,) = recipe.datasets
    chosen = build_partitions(ws, tmp_path / "data", recipe, [spec.key])
    choice = chosen[(spec.key, 1)]
    data = json.loads(choice.path.read_text())
    assert data["params"]["base_to_novel"] is True and data["params"]["base_classes"] == 18
    assert len(data["class_names"]) == 18 and len(data["novel_class_names"]) == 18
    owned = [set(map(int, c["train_histogram"])) for c in data["clients"]]
    assert len(owned) == 6 and all(len(classes) == 3 for classes in owned)
    assert set().union(*owned) == set(range(18))
    assert find_partitions(ws, recipe)[(spec.key, 1)].sha256 == choice.sha256


# ---- the partition option: validation ---------------------------------------------------

BAD_RECIPE = """
[table]
title = "T"
seeds = [1]
columns = "{columns}"
[[datasets]]
name = "synthetic"
partition = {{ scheme = "pathological", clients = 2, shots = 1{extra} }}
[[rows]]
method = "promptfl"
"""


@pytest.mark.parametrize("value", ['"yes"', "1", '"true"'])
def test_a_bad_base_to_novel_value_is_a_one_line_error(cli, tmp_path, value):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_RECIPE.format(columns="datasets", extra=f", base_to_novel = {value}"))
    message = one_line_error(cli("sweep", "--table", str(path), "--dry-run"))
    assert "datasets[0].partition.base_to_novel must be true or false" in message and "fix the file" in message


def test_a_bad_base_to_novel_value_through_the_installed_script(tmp_path):
    if not SCRIPT.exists():
        pytest.skip(f"no installed console script at {SCRIPT}")
    path = tmp_path / "bad.toml"
    path.write_text(BAD_RECIPE.format(columns="datasets", extra=', base_to_novel = "yes"'))
    env = {k: v for k, v in os.environ.items() if k != "PFEDMOAP_DEBUG"}
    done = subprocess.run(
        [str(SCRIPT), "--workspace", str(tmp_path / "ws"), "report", "--table", str(path)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "base_to_novel must be true or false, got 'yes'" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_base_to_novel_columns_need_base_to_novel_partitions(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_RECIPE.format(columns="base-to-novel", extra=""))
    with pytest.raises(ConfigError, match="needs base_to_novel = true") as error:
        load_table_recipe(str(path))
    assert "\n" not in str(error.value)
    path.write_text(BAD_RECIPE.format(columns="base-to-novel", extra=", base_to_novel = true"))
    assert load_table_recipe(str(path)).generalisation


def test_a_plain_partition_spec_builds_the_settings_it_always_did():
    path = Path(__file__).resolve().parents[1] / "data_recipes" / "table1.toml"
    spec = load_table_recipe(str(path)).datasets[0].partition
    assert spec.base_to_novel is False
    assert spec.settings(3).params() == {"num_clients": 10, "seed": 3, "shots": 16}  # no base_to_novel key: same partition files


def test_dataset_recipe_schema_knows_base_to_novel():
    recipe = {"dataset": {"name": "x", "classes": 4, "layout": "-", "splits": "-"}, "partition": {"scheme": "pathological", "base_to_novel": True}}
    assert check_recipe("x", recipe) == []
    recipe["partition"]["base_to_novel"] = "true"
    assert check_recipe("x", recipe) == ["x: [partition] base_to_novel must be true or false, got 'true'"]


# ---- cells from fabricated runs -----------------------------------------------------------

FAKE_TABLE = """
[table]
title = "Fake base-to-novel table"
seeds = [1, 2, 3]
partition_seed = 4
columns = "base-to-novel"
[train]
rounds = 2
backbone = "tiny-vit"
pretrained = "none"
[[datasets]]
name = "fake_g"
label = "Fake G"
partition = { scheme = "pathological", clients = 2, shots = 1, base_to_novel = true }
[[rows]]
key = "promptfl"
label = "PromptFL"
method = "promptfl"
[[rows]]
key = "pfedprompt"
label = "pFedPrompt"
method = "pfedprompt"
[paper]
promptfl = { fake_g = { base = 50.0, novel = [40.0, 1.0] } }
"""

HEADER = "run_id,method,dataset,partition_sha256,seed,round,client_id,domain,split,metric,value,num_examples\n"

#: Final-round accuracies (fractions) per seed, per client: test (Local), base, novel. Round 0 holds decoys.
FINAL = {
    "promptfl": {
        1: {"test": [0.90, 0.70], "base": [0.60, 0.50], "novel": [0.40, 0.30]},
        2: {"test": [0.80, 0.80], "base": [0.55, 0.65], "novel": [0.20, 0.50]},
        3: {"test": [1.00, 0.60], "base": [0.70, 0.70], "novel": [0.35, 0.45]},
    },
    "pfedprompt": {
        1: {"test": [0.95, 0.85], "base": [0.30, 0.40]},
        2: {"test": [0.75, 0.95], "base": [0.20, 0.60]},
        3: {"test": [0.85, 0.85], "base": [0.50, 0.30]},
    },
}


def fake_b2n_partition(base_to_novel: bool) -> Partition:
    params = {"num_clients": 2, "seed": 4, "shots": 1}
    if base_to_novel:
        params.update(base_to_novel=True, base_classes=2)
    return Partition(
        dataset="fake_g",
        dataset_options={},
        dataset_fingerprint="f" * 64,
        class_names=("a", "b") if base_to_novel else ("a", "b", "c", "d"),
        scheme="pathological",
        params=params,
        clients=tuple(PartitionClient(i, (i,), (i,), train_histogram={i: 1}, test_histogram={i: 1}) for i in range(2)),
        novel_class_names=("c", "d") if base_to_novel else (),
    )


def write_run(ws: Workspace, recipe, choice, row: str, seed: int) -> str:
    """run.json, progress.json and a metrics.csv in the real long format, written line by line."""
    settings = recipe.cell_settings("fake_g", row, seed)
    run_id = default_run_id(settings, "fake_g", choice.sha256)
    paths = RunPaths(ws.run_dir(run_id))
    paths.root.mkdir(parents=True)
    paths.run_json.write_text(
        json.dumps({"schema": "pfedmoap.run/1", "run_id": run_id, "partition_file": str(choice.path), "settings": {"method": settings.method, "rounds": 2}})
    )
    lines = [HEADER]
    for round_index in (0, 1):
        for split, per_client in FINAL[row][seed].items():
            for client, value in enumerate(per_client):
                value = 0.99 if round_index == 0 else value  # the decoy round must not count
                lines.append(f"{run_id},{settings.method},fake_g,{choice.sha256},{seed},{round_index},{client},,{split},accuracy,{value!r},10\n")
                if split == "test":
                    lines.append(f"{run_id},{settings.method},fake_g,{choice.sha256},{seed},{round_index},{client},,test,loss,1.0,10\n")
    paths.metrics_csv.write_text("".join(lines))
    mark_round_complete(paths, 2, 2)
    return run_id


@pytest.fixture
def b2n_report(tmp_path):
    path = tmp_path / "fake_b2n.toml"
    path.write_text(FAKE_TABLE)
    recipe = load_table_recipe(str(path))
    ws = Workspace(tmp_path / "ws")
    save_partition(fake_b2n_partition(True), ws.partitions_dir, make_current=False)
    save_partition(fake_b2n_partition(False), ws.partitions_dir, make_current=False)  # same scheme and seed, not base-to-novel
    partitions = find_partitions(ws, recipe)
    choice = partitions[("fake_g", 4)]
    assert choice is not None and not choice.note  # only the base-to-novel partition matches
    assert json.loads(choice.path.read_text())["params"]["base_to_novel"] is True
    for row in FINAL:
        for seed in (1, 2, 3):
            write_run(ws, recipe, choice, row, seed)
    warnings: list[str] = []
    report = table_report(ws, recipe, warn=warnings.append)
    assert warnings == []
    return recipe, report


def independent(row: str) -> dict[str, tuple[float, float] | None]:
    """(mean, sample std) over seeds of each column, computed plainly from FINAL; None where a run has no novel scores."""
    per_seed = {key: [] for key in COLUMN_KEYS}
    for seed in (1, 2, 3):
        acc = FINAL[row][seed]
        local = 100 * sum(acc["test"]) / len(acc["test"])
        base = 100 * sum(acc["base"]) / len(acc["base"])
        per_seed["local"].append(local)
        per_seed["base"].append(base)
        if "novel" in acc:
            novel = 100 * sum(acc["novel"]) / len(acc["novel"])
            per_seed["novel"].append(novel)
            per_seed["hm"].append(2 * base * novel / (base + novel))
            per_seed["hm3"].append(3 / (1 / local + 1 / base + 1 / novel))
    return {key: (statistics.mean(v), statistics.stdev(v)) if v else None for key, v in per_seed.items()}


@pytest.mark.parametrize("row", ["promptfl", "pfedprompt"])
def test_cells_equal_an_independent_computation(b2n_report, row):
    recipe, report = b2n_report
    expected = independent(row)
    for column in recipe.columns("fake_g"):
        cell = report.cell(row, column)
        want = expected[column.key]
        if want is None:
            assert cell.not_applicable and not cell.complete and cell.mean is None, (row, column.key)
            assert cell.seeds_na == (1, 2, 3) and cell.seeds_missing == ()
        else:
            assert cell.complete and not cell.not_applicable, (row, column.key)
            assert cell.mean == pytest.approx(want[0], abs=1e-9), (row, column.key)
            assert cell.std == pytest.approx(want[1], abs=1e-9), (row, column.key)
    base = {c.key: c for c in recipe.columns("fake_g")}
    if row == "promptfl":
        assert report.cell(row, base["base"]).diff == pytest.approx(expected["base"][0] - 50.0)
        assert report.cell(row, base["novel"]).paper.std == 1.0


def test_markdown_marks_not_applicable_cells_and_says_which_hm_is_which(b2n_report):
    recipe, report = b2n_report
    markdown = render.to_markdown(report)
    rows = {line.split(" | ")[0].lstrip("| "): [c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("| ")}
    header = rows["Method"]
    assert header[1:4] == ["Fake G Local", "paper", "Δ"] and header[10] == "Fake G HM" and header[13] == "Fake G HM3"
    pfedprompt = rows["pFedPrompt"]
    assert [pfedprompt[i] for i in (7, 10, 13)] == ["n/a", "n/a", "n/a"]  # Novel, HM, HM3
    exp = independent("pfedprompt")["base"]
    assert pfedprompt[4].replace("*", "") == f"{exp[0]:.2f} ± {exp[1]:.2f}"
    assert "HM = 2·Base·Novel/(Base+Novel), the two-way harmonic mean" in markdown
    assert "HM3 = 3/(1/Local+1/Base+1/Novel), the three-way harmonic mean (FedTPG's)" in markdown
    footnotes = [line for line in markdown.splitlines() if line.startswith("n/a: ")]
    assert len(footnotes) == 1 and footnotes[0].startswith("n/a: pFedPrompt (Novel, HM, HM3; Fake G)")
    assert "tied to the classes it trained on" in footnotes[0]
    assert "- 7/7 cells complete (3 not applicable).\n" in markdown  # nothing left to run: no "fill the rest" hint
    tex = render.to_latex(report)
    assert "% n/a: pFedPrompt" in tex
    assert tex.count(" & n/a") >= 3


def test_a_base_to_novel_run_without_its_novel_rows_is_left_out_not_n_a(b2n_report, tmp_path):
    """PromptFL scores novel classes: a finished run of it that lacks them is damaged (missing), never "n/a"."""
    recipe, report = b2n_report
    ws = Workspace(tmp_path / "ws")
    run_id = report.cell("promptfl", recipe.columns("fake_g")[2]).run_ids[1]
    metrics = ws.run_dir(run_id) / "metrics.csv"
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(keepends=True) if ",novel," not in line))
    warnings: list[str] = []
    again = table_report(ws, recipe, warn=warnings.append)
    novel = again.cell("promptfl", recipe.columns("fake_g")[2])
    assert not novel.not_applicable and novel.seeds_missing == (2,) and novel.seeds_damaged == (2,)
    assert len(warnings) == 1 and run_id in warnings[0]
    assert math.isclose(again.cell("pfedprompt", recipe.columns("fake_g")[1]).mean, independent("pfedprompt")["base"][0])


def test_a_run_without_base_rows_leaves_its_seed_missing_in_every_base_to_novel_column(b2n_report, tmp_path):
    """A run whose run.json does not name its partition (so no check knows it is base-to-novel) and has no base rows."""
    recipe, report = b2n_report
    ws = Workspace(tmp_path / "ws")
    columns = {c.key: c for c in recipe.columns("fake_g")}
    run_id = report.cell("promptfl", columns["local"]).run_ids[2]
    run_dir = ws.run_dir(run_id)
    (run_dir / "run.json").write_text(json.dumps({"schema": "pfedmoap.run/1", "run_id": run_id}))
    metrics = run_dir / "metrics.csv"
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(keepends=True) if ",base," not in line and ",novel," not in line))
    again = table_report(ws, recipe)
    assert again.cell("promptfl", columns["local"]).complete  # Local needs only the test rows
    for key in ("base", "novel", "hm", "hm3"):
        cell = again.cell("promptfl", columns[key])
        assert cell.seeds_missing == (3,) and cell.seeds_done == (1, 2) and not cell.not_applicable, key


@pytest.mark.parametrize("base_to_novel", [True, False])
def test_a_table_finds_its_own_kind_of_partition(tmp_path, base_to_novel):
    """A base-to-novel partition and a plain one of the same scheme, clients and seed are told apart, both ways."""
    path = tmp_path / "t.toml"
    columns, extra = ("base-to-novel", ", base_to_novel = true") if base_to_novel else ("datasets", "")
    path.write_text(FAKE_TABLE.split("[paper]")[0].replace('"base-to-novel"', f'"{columns}"').replace(", base_to_novel = true", extra))
    recipe = load_table_recipe(str(path))
    ws = Workspace(tmp_path / "ws")
    files = {flag: save_partition(fake_b2n_partition(flag), ws.partitions_dir, make_current=False)[0] for flag in (True, False)}
    choice = find_partitions(ws, recipe)[("fake_g", 4)]
    assert choice is not None and not choice.note and choice.path == files[base_to_novel]
