"""``pfedmoap sweep``: partitions, skipping finished runs, resuming interrupted ones, --only, --dry-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import one_line_error

# Three cheap cells on the synthetic world with the tiny random CLIP.
SWEEP_TABLE = """
[table]
title = "Sweep test table"
seeds = [1]
partition_seed = 3
columns = "domains"
compare_paper = false
[train]
rounds = 2
local_epochs = 1
batch_size = 8
n_ctx = 2
backbone = "tiny-vit"
pretrained = "none"
[[datasets]]
name = "synthetic"
domains = ["photo", "sketch", "noisy"]
partition = { scheme = "iid", clients = 3, clients_per_domain = 1, dataset_options = { train_per_class = 1, test_per_class = 1 } }
[[rows]]
key = "zsclip"
method = "zsclip"
train = { rounds = 1 }
[[rows]]
key = "coop"
method = "coop"
[[rows]]
key = "promptfl"
method = "promptfl"
"""


@pytest.fixture
def table(tmp_path) -> Path:
    path = tmp_path / "sweeptest.toml"
    path.write_text(SWEEP_TABLE)
    return path


def test_dry_run_on_an_empty_workspace(cli, table, tmp_path):
    result = cli("sweep", "--table", str(table), "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "3 runs: 0 done, 0 partial, 3 missing" in result.stdout
    assert result.stdout.count("(partition not created yet)") == 3
    assert not (tmp_path / "ws" / "runs").exists()  # a dry run changes nothing


def test_sweep_resumes_after_an_interruption_without_redoing_finished_runs(cli, table, tmp_path, monkeypatch):
    from pfedmoap_cli.report import sweep as sweep_module

    real = sweep_module.execute_run
    calls: list[tuple[str, int]] = []

    def interrupted(ws, data_root, settings, partition_path, **kwargs):
        calls.append((settings.method, settings.seed))
        if settings.method == "coop":  # the sweep is stopped half-way through the second run
            real(ws, data_root, settings, partition_path, **{**kwargs, "stop_after": 1})
            raise KeyboardInterrupt
        return real(ws, data_root, settings, partition_path, **kwargs)

    monkeypatch.setattr(sweep_module, "execute_run", interrupted)
    result = cli("sweep", "--table", str(table))
    assert result.exit_code == 130 and "continue with 'pfedmoap sweep --table" in result.stderr
    assert calls == [("zsclip", 1), ("coop", 1)]

    ws = tmp_path / "ws"
    record = json.loads((ws / "sweeps" / "sweeptest.json").read_text())
    assert record["partition_seed"] == 3 and record["schema"] == "pfedmoap.sweep/2"
    assert set(record["partitions"]["synthetic"]) == {"3"}  # fixed: one partition, keyed by its seed
    partition_file = ws / "partitions" / record["partitions"]["synthetic"]["3"]["file"]
    assert json.loads(partition_file.read_text())["params"]["seed"] == 3
    assert not (ws / "partitions" / "current").exists()  # the user's current partition is left alone

    result = cli("sweep", "--table", str(table), "--dry-run")
    assert "3 runs: 1 done, 1 partial, 1 missing" in result.stdout
    assert "partial 1/2 rounds" in result.stdout
    runs = {p.name.split("-")[1]: p for p in (ws / "runs").iterdir()}
    assert set(runs) == {"zsclip", "coop"}
    stamps = {name: (p / "metrics.csv").stat().st_mtime_ns for name, p in runs.items()}

    calls.clear()

    def counting(ws_, data_root, settings, partition_path, **kwargs):
        calls.append((settings.method, settings.seed))
        return real(ws_, data_root, settings, partition_path, **kwargs)

    monkeypatch.setattr(sweep_module, "execute_run", counting)
    result = cli("sweep", "--table", str(table))
    assert result.exit_code == 0, result.stderr
    assert calls == [("coop", 1), ("promptfl", 1)]  # the finished zsclip run is not touched
    assert (runs["zsclip"] / "metrics.csv").stat().st_mtime_ns == stamps["zsclip"]
    assert (runs["coop"] / "metrics.csv").stat().st_mtime_ns != stamps["coop"]
    progress = json.loads((runs["coop"] / "progress.json").read_text())
    assert progress["completed_rounds"] == 2 and progress["finished"]

    calls.clear()
    result = cli("sweep", "--table", str(table))
    assert result.exit_code == 0 and calls == [] and "nothing to run" in result.stdout

    result = cli("report", "--table", str(table), "--no-plots")
    assert result.exit_code == 0, result.stderr
    assert "12/12 cells complete" in result.stdout
    body = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(body) == 1 + 3 and not any("missing" in line for line in body)


def test_only_filters_rows_and_datasets(cli, table):
    result = cli("sweep", "--table", str(table), "--dry-run", "--only", "coop", "--only", "synthetic")
    assert result.exit_code == 0, result.stderr
    assert "1 runs: 0 done, 0 partial, 1 missing" in result.stdout
    message = one_line_error(cli("sweep", "--table", str(table), "--only", "fedsomething"))
    assert "--only fedsomething matches no dataset, row or method" in message and "promptfl" in message


def test_unregistered_method_is_a_one_line_error(cli, table):
    table.write_text(SWEEP_TABLE + '[[rows]]\nkey = "fancy"\nmethod = "fedfancy"\n')
    message = one_line_error(cli("sweep", "--table", str(table)))
    assert "needs method(s) fedfancy, not available" in message and "--only (zsclip, coop, promptfl)" in message
    result = cli("sweep", "--table", str(table), "--dry-run")  # the dry run still lists them, flagged
    assert result.exit_code == 0 and "[method fedfancy not available]" in result.stdout


def test_bad_method_options_fail_before_anything_runs(cli, table, tmp_path):
    table.write_text(SWEEP_TABLE.replace('key = "coop"\nmethod = "coop"', 'key = "coop"\nmethod = "coop"\ntrain = { method_options = { lam = 0.0 } }'))
    message = one_line_error(cli("sweep", "--table", str(table)))
    assert "coop takes no method options" in message
    assert not (tmp_path / "ws" / "runs").exists()


def test_unknown_table(cli):
    message = one_line_error(cli("sweep", "--table", "5", "--dry-run"))
    assert "unknown table '5'" in message and "demo" in message


# One round of one epoch on the tiny random CLIP: the [train] table of the tables below.
ONE_ROUND_TINY = """[train]
rounds = 1
local_epochs = 1
batch_size = 8
n_ctx = 2
backbone = "tiny-vit"
pretrained = "none"
"""


TWO_PARTITIONS_TABLE = """
[table]
title = "One dataset, two partitions"
seeds = [1]
partition_seed = 2
columns = "datasets"
compare_paper = false
{one_round_tiny}[[datasets]]
name = "synthetic"
key = "synthetic-patho"
label = "Pathological"
partition = { scheme = "pathological", clients = 3, shots = 1, dataset_options = { train_per_class = 1, test_per_class = 1 } }
[[datasets]]
name = "synthetic"
key = "synthetic-dir"
label = "Dirichlet"
partition = { scheme = "dirichlet", clients = 3, alpha = 0.5, min_size = 1, dataset_options = { train_per_class = 1, test_per_class = 1 } }
[[rows]]
key = "promptfl"
method = "promptfl"
""".replace("{one_round_tiny}", ONE_ROUND_TINY)


def test_one_dataset_under_two_partitions_gives_two_columns(cli, tmp_path):
    table = tmp_path / "twoparts.toml"
    table.write_text(TWO_PARTITIONS_TABLE)
    result = cli("sweep", "--table", str(table), "--only", "synthetic-dir", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "1 runs: 0 done, 0 partial, 1 missing" in result.stdout  # a key selects its entry only
    result = cli("sweep", "--table", str(table))
    assert result.exit_code == 0, result.stderr

    ws = tmp_path / "ws"
    record = json.loads((ws / "sweeps" / "twoparts.json").read_text())
    assert set(record["partitions"]) == {"synthetic-patho", "synthetic-dir"}
    schemes = {key: json.loads((ws / "partitions" / entry["2"]["file"]).read_text())["scheme"] for key, entry in record["partitions"].items()}
    assert schemes == {"synthetic-patho": "pathological", "synthetic-dir": "dirichlet"}
    assert len(list((ws / "runs").iterdir())) == 2  # one run per partition: the run id binds the partition

    result = cli("report", "--table", str(table), "--no-plots")
    assert result.exit_code == 0, result.stderr
    assert "2/2 cells complete" in result.stdout
    header = next(line for line in result.stdout.splitlines() if line.startswith("| "))
    assert "Pathological" in header and "Dirichlet" in header
    result = cli("sweep", "--table", str(table), "--only", "synthetic", "--dry-run")  # the name selects both entries
    assert "2 runs: 2 done" in result.stdout


def test_a_dataset_key_used_twice_is_refused(tmp_path):
    from pfedmoap_cli.errors import ConfigError
    from pfedmoap_cli.report.table_recipes import load_table_recipe

    path = tmp_path / "dup.toml"
    path.write_text(TWO_PARTITIONS_TABLE.replace('key = "synthetic-dir"', 'key = "synthetic-patho"'))
    with pytest.raises(ConfigError, match="dataset key synthetic-patho is used twice"):
        load_table_recipe(str(path))


def test_sweeps_sharing_a_workspace_leave_a_run_in_use_to_its_owner(cli, table, tmp_path):
    import os
    import socket

    result = cli("sweep", "--table", str(table), "--only", "zsclip")  # creates the partition and one finished run
    assert result.exit_code == 0, result.stderr
    listing = cli("sweep", "--table", str(table), "--dry-run").stdout
    coop_id = next(line.split()[-1] for line in listing.splitlines() if " coop " in line)
    locks = tmp_path / "ws" / "locks"
    locks.mkdir(exist_ok=True)
    # Another sweep (a live process) is training the coop cell.
    (locks / f"{coop_id}.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "now"}))
    result = cli("sweep", "--table", str(table))
    assert result.exit_code == 0, result.stderr
    assert f"skipped synthetic coop seed 1: run {coop_id} is being trained by pid {os.getppid()}" in result.stderr
    assert "1 run(s) were being trained by another process and were left to it" in result.stdout
    runs = {p.name for p in (tmp_path / "ws" / "runs").iterdir()}
    assert coop_id not in runs and len(runs) == 2  # zsclip and promptfl ran, coop was left alone

    (locks / f"{coop_id}.lock").unlink()  # the other sweep is done (here: gone)
    result = cli("sweep", "--table", str(table))
    assert result.exit_code == 0 and coop_id in {p.name for p in (tmp_path / "ws" / "runs").iterdir()}


# Two seeds, no partition_seed: each seed gets its own partition (the default).
PER_SEED_TABLE = """
[table]
title = "Per-seed partitions"
seeds = [1, 2]
columns = "datasets"
compare_paper = false
{one_round_tiny}[[datasets]]
name = "synthetic"
partition = { scheme = "dirichlet", clients = 3, alpha = 0.5, min_size = 1, dataset_options = { train_per_class = 1, test_per_class = 1 } }
[[rows]]
key = "zsclip"
method = "zsclip"
[[rows]]
key = "promptfl"
method = "promptfl"
""".replace("{one_round_tiny}", ONE_ROUND_TINY)

PER_SEED_MODE = "partitions: one per seed (partition seed = run seed)"


def run_partitions(ws: Path) -> dict[tuple[str, int], str]:
    """(method, seed) -> the partition sha256 recorded in each run's run.json."""
    found = {}
    for run in (ws / "runs").iterdir():
        record = json.loads((run / "run.json").read_text())
        found[(record["settings"]["method"], record["settings"]["seed"])] = record["partition_sha256"]
    return found


def test_per_seed_partitions_are_built_recorded_and_used_by_each_seeds_runs(cli, tmp_path):
    table = tmp_path / "perseed.toml"
    table.write_text(PER_SEED_TABLE)
    result = cli("sweep", "--table", str(table), "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert f"4 runs: 0 done, 0 partial, 4 missing (seeds 1, 2; {PER_SEED_MODE})" in result.stdout
    assert "partition of synthetic, seed 1: not created yet" in result.stdout
    assert "partition of synthetic, seed 2: not created yet" in result.stdout

    result = cli("sweep", "--table", str(table))
    assert result.exit_code == 0, result.stderr
    assert PER_SEED_MODE in result.stdout
    ws = tmp_path / "ws"
    record = json.loads((ws / "sweeps" / "perseed.json").read_text())
    assert record["schema"] == "pfedmoap.sweep/2" and record["partition_seed"] == "run"
    entries = record["partitions"]["synthetic"]
    assert set(entries) == {"1", "2"}
    assert entries["1"]["sha256"] != entries["2"]["sha256"] and entries["1"]["file"] != entries["2"]["file"]
    for seed in (1, 2):
        partition = json.loads((ws / "partitions" / entries[str(seed)]["file"]).read_text())
        assert partition["params"]["seed"] == seed and entries[str(seed)]["partition_seed"] == seed
    used = run_partitions(ws)
    assert used == {(method, seed): entries[str(seed)]["sha256"] for method in ("zsclip", "promptfl") for seed in (1, 2)}

    result = cli("sweep", "--table", str(table), "--dry-run")
    assert "4 runs: 4 done" in result.stdout
    assert f"partition of synthetic, seed 2: {entries['2']['file']}" in result.stdout

    result = cli("report", "--table", str(table), "--no-plots")
    assert result.exit_code == 0, result.stderr
    assert "2/2 cells complete" in result.stdout and f"{PER_SEED_MODE}." in result.stdout
    assert f"synthetic seed 1: partition {entries['1']['file']}" in result.stdout
    reports = ws / "reports"
    assert PER_SEED_MODE in (reports / "perseed.tex").read_text()
    csv_lines = (reports / "perseed.csv").read_text().splitlines()
    assert csv_lines[0].endswith(",partitions") and all(line.endswith(PER_SEED_MODE) for line in csv_lines[1:])


def test_a_fixed_partition_seed_gives_every_seed_the_same_partition(cli, tmp_path):
    table = tmp_path / "fixed.toml"
    table.write_text(PER_SEED_TABLE.replace('seeds = [1, 2]', 'seeds = [1, 2]\npartition_seed = 1').replace(
        '[[rows]]\nkey = "promptfl"\nmethod = "promptfl"\n', ""))
    result = cli("sweep", "--table", str(table))
    assert result.exit_code == 0, result.stderr
    ws = tmp_path / "ws"
    record = json.loads((ws / "sweeps" / "fixed.json").read_text())
    assert record["partition_seed"] == 1 and set(record["partitions"]["synthetic"]) == {"1"}
    assert len(list((ws / "partitions").glob("*.json"))) == 1
    used = run_partitions(ws)
    assert set(used) == {("zsclip", 1), ("zsclip", 2)} and set(used.values()) == {record["partitions"]["synthetic"]["1"]["sha256"]}
    result = cli("report", "--table", str(table), "--no-plots")
    assert result.exit_code == 0 and "partitions: fixed, seed 1." in result.stdout
    dry = cli("sweep", "--table", str(table), "--dry-run").stdout
    assert "2 runs: 2 done, 0 partial, 0 missing (seeds 1, 2; partitions: fixed, seed 1)" in dry

    # The same table with per-seed partitions: seed 1's partition is the one already there
    # (built with seed 1 either way), so its run counts; seed 2 needs its own partition.
    table.write_text(table.read_text().replace("partition_seed = 1\n", 'partition_seed = "run"\n'))
    dry = cli("sweep", "--table", str(table), "--dry-run").stdout
    assert f"2 runs: 1 done, 0 partial, 1 missing (seeds 1, 2; {PER_SEED_MODE})" in dry
    assert "partition of synthetic, seed 2: not created yet" in dry


def test_a_sweep_record_of_the_old_format_is_still_read(cli, tmp_path, monkeypatch):
    from pfedmoap_cli.engine.workspace import Workspace
    from pfedmoap_cli.report import cells
    from pfedmoap_cli.report.table_recipes import load_table_recipe

    table = tmp_path / "fixed.toml"
    table.write_text(PER_SEED_TABLE.replace('seeds = [1, 2]', 'seeds = [1, 2]\npartition_seed = 4'))
    assert cli("sweep", "--table", str(table), "--only", "zsclip").exit_code == 0
    ws = Workspace(tmp_path / "ws")
    path = ws.root / "sweeps" / "fixed.json"
    entry = json.loads(path.read_text())["partitions"]["synthetic"]["4"]
    # pfedmoap.sweep/1: one partition per dataset key.
    path.write_text(json.dumps({"schema": "pfedmoap.sweep/1", "table": "fixed", "partition_seed": 4, "partitions": {"synthetic": entry}}))

    def no_scan(_ws):
        raise AssertionError("the partition should come from the record, not from a scan")

    with monkeypatch.context() as patched:
        patched.setattr(cells, "_loaded_partitions", no_scan)
        found = cells.find_partitions(ws, load_table_recipe(str(table)))
    assert set(found) == {("synthetic", 4)} and found[("synthetic", 4)].sha256 == entry["sha256"]

    result = cli("sweep", "--table", str(table))  # rewrites the record in the new format, keeping the entry
    assert result.exit_code == 0, result.stderr
    record = json.loads(path.read_text())
    assert record["schema"] == "pfedmoap.sweep/2" and record["partitions"]["synthetic"] == {"4": entry}
