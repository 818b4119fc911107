"""The benchmark scripts run end to end in their smallest modes and print what their readers parse.

Speeds are not checked (the numbers depend on the machine); the output
format is: bench_round's last line, bench_scale's table and CSV columns, and
the checkpoint bytes the measuring observer attributes to a round.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCALE_COLUMNS = [
    "clients", "method", "participants", "rounds", "round_s", "train_s", "eval_s", "eval_ms_per_client",
    "peak_rss_mb", "ckpt_mb_per_round", "ckpt_files_per_round",
]


def run_script(name: str, *args: str) -> list[str]:
    """Run ``benchmarks/<name>`` with this interpreter on one thread; its stdout lines (it must exit 0)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def table_rows(lines: list[str]) -> list[list[str]]:
    """The cells of every markdown table row (the header and the ``|---|`` rule included)."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]


def test_bench_round_ends_with_the_smallest_speed_up():
    lines = run_script("bench_round.py", "--smoke")
    assert re.fullmatch(r"min speed-up \d+\.\d\d", lines[-1]), lines[-1]
    header, rule, *rows = table_rows(lines)
    assert header[0] == "method" and header[-1] == "speed-up" and set(rule) == {"---"}
    assert [row[0] for row in rows] == ["promptfl", "pfedmoap"]
    # The last line is the smallest of the per-method ratios printed above it, at the same rounding.
    ratios = [float(row[-1]) for row in rows]
    assert float(lines[-1].split()[-1]) == pytest.approx(min(ratios), abs=0.011)
    for row in rows:  # each ratio is old / new of its own row
        old, new = float(row[2]), float(row[3])
        assert float(row[-1]) == pytest.approx(old / new, abs=0.011)


def test_bench_scale_quick_writes_its_table(tmp_path: Path):
    lines = run_script("bench_scale.py", "--quick", "--methods", "pfedmoap", "--out", str(tmp_path))
    header, rule, *rows = table_rows(lines)
    assert header == SCALE_COLUMNS and len(rule) == len(SCALE_COLUMNS)
    assert [(row[0], row[1], row[2]) for row in rows] == [("10", "pfedmoap", "10"), ("100", "pfedmoap", "10")]
    with open(tmp_path / "bench_scale.csv", newline="", encoding="utf-8") as handle:
        saved = list(csv.DictReader(handle))
    assert list(saved[0]) == SCALE_COLUMNS and [row["clients"] for row in saved] == ["10", "100"]
    for row in saved:
        assert float(row["round_s"]) >= float(row["eval_s"]) > 0
        assert float(row["train_s"]) == pytest.approx(float(row["round_s"]) - float(row["eval_s"]), rel=1e-6, abs=1e-9)
        assert float(row["ckpt_mb_per_round"]) > 0 and float(row["peak_rss_mb"]) > 0
    assert (tmp_path / "bench_scale.md").read_text(encoding="utf-8").count("| pfedmoap |") == 2


def test_round_clock_counts_the_round_folder_and_restores_evaluate(tmp_path: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from _measure import measure_run

    from pfedmoap_cli import api
    from pfedmoap_cli.engine.federation import Federation
    from pfedmoap_cli.engine.settings import TrainSettings

    evaluate = Federation.evaluate_round
    options = {"train_per_class": 2, "test_per_class": 1}
    part = api.partition(dataset="synthetic", workspace=tmp_path / "ws", data_root=tmp_path, iid=True, clients=4, seed=1, dataset_options=options)
    settings = TrainSettings(
        method="promptfl", rounds=2, local_epochs=1, frac=0.5, batch_size=8, n_ctx=2, backbone="tiny-vit", pretrained="none",
        device="cpu", keep_rounds="all",
    )
    rounds = measure_run(tmp_path / "ws", tmp_path, settings, part.path, run_id="clock")
    assert Federation.evaluate_round is evaluate
    assert [r.round_index for r in rounds] == [0, 1]
    for r in rounds:
        folder = tmp_path / "ws" / "runs" / "clock" / "checkpoints" / f"round-{r.round_index:04d}"
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert files and r.checkpoint_files == len(files)
        assert r.checkpoint_bytes == sum(p.stat().st_size for p in files)
        assert 0 < r.eval_seconds < r.seconds


def test_runs_measured_in_turn_never_overlap(tmp_path: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from _measure import measure_runs_in_turn

    from pfedmoap_cli import api
    from pfedmoap_cli.engine.settings import TrainSettings

    options = {"train_per_class": 1, "test_per_class": 1}
    part = api.partition(dataset="synthetic", workspace=tmp_path / "ws", data_root=tmp_path, iid=True, clients=3, seed=1, dataset_options=options)
    base = TrainSettings(method="promptfl", local_epochs=1, batch_size=8, n_ctx=2, backbone="tiny-vit", pretrained="none", device="cpu")
    runs = {"a": TrainSettings(**{**base.to_json(), "rounds": 3}), "b": TrainSettings(**{**base.to_json(), "rounds": 2, "seed": 2})}
    measured = measure_runs_in_turn(tmp_path / "ws", tmp_path, runs, part.path)
    assert {name: [r.round_index for r in rounds] for name, rounds in measured.items()} == {"a": [0, 1, 2], "b": [0, 1]}
    timeline = sorted((r.started, r.ended, name) for name, rounds in measured.items() for r in rounds)
    assert [name for _, _, name in timeline] == ["a", "b", "a", "b", "a"]  # in turn; "a" goes on alone once "b" is done
    for (_, previous_end, _), (start, _, _) in zip(timeline, timeline[1:]):
        assert start >= previous_end  # one round at a time


def test_written_since_counts_new_and_replaced_files_only(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from _measure import written_since

    before = {"kept": (1, 100, 5), "replaced": (2, 30, 5), "removed": (3, 7, 5)}
    after = {"kept": (1, 100, 5), "replaced": (9, 30, 8), "new": (4, 12, 8)}
    assert written_since(before, after) == (30 + 12, 2)
