"""``pfedmoap report`` with one damaged or incomplete run: that run is left out with one warning, the others are reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pfedmoap_cli.artifacts.metrics import MetricRow, append_metrics
from pfedmoap_cli.engine.run_record import mark_round_complete
from pfedmoap_cli.engine.workspace import RunPaths, Workspace
from pfedmoap_cli.report.runs import incomplete_reason, read_metrics_checked, summarize_runs

SCRIPT = Path(sys.executable).with_name("pfedmoap")


def rows(run_id: str, accuracies: list[list[float]], missing: dict[int, list[int]] | None = None) -> list[MetricRow]:
    """Test rows of ``accuracies[r][c]`` plus 'missing' rows ``missing[r] = [clients]``."""
    out = []
    for r, per_client in enumerate(accuracies):
        for c, acc in enumerate(per_client):
            if acc is None:
                continue
            common = dict(run_id=run_id, method="promptfl", dataset="synthetic", partition_sha256="s" * 64, seed=1, round=r,
                          client_id=c, domain="", split="test", num_examples=10)
            out += [MetricRow(metric="accuracy", value=acc, **common), MetricRow(metric="loss", value=1.0, **common)]
        for c in (missing or {}).get(r, []):
            out.append(MetricRow(run_id, "promptfl", "synthetic", "s" * 64, 1, r, c, "", "test", "missing", 1.0, 0))
    return out


def fabricate(ws: Workspace, run_id: str, accuracies, completed=None, missing=None) -> RunPaths:
    paths = RunPaths(ws.run_dir(run_id))
    paths.root.mkdir(parents=True)
    paths.run_json.write_text(json.dumps({"schema": "pfedmoap.run/1", "run_id": run_id}))
    append_metrics(paths.metrics_csv, rows(run_id, accuracies, missing))
    mark_round_complete(paths, len(accuracies) if completed is None else completed, len(accuracies))
    return paths


def frame_of(accuracies, missing=None) -> pd.DataFrame:
    return pd.DataFrame([r.__dict__ for r in rows("r", accuracies, missing)])


# ---- incomplete_reason --------------------------------------------------------------------------

def test_complete_rows_have_no_reason():
    assert incomplete_reason(frame_of([[0.5, 0.6], [0.7, 0.8]]), 2, 2) is None
    assert incomplete_reason(frame_of([[0.5, 0.6], [0.7, None]], missing={1: [1]}), 2, 2) is None  # recorded as missing


def test_a_client_without_accuracy_or_missing_row_is_incomplete():
    reason = incomplete_reason(frame_of([[0.5, 0.6], [0.7, None]]), 2, 2)
    assert reason and "round 1" in reason and "client(s) 1" in reason


def test_clients_differing_between_rounds_is_incomplete_without_a_client_count():
    reason = incomplete_reason(frame_of([[0.5, 0.6, 0.7], [0.7, 0.8, None]]), 2, None)
    assert reason and "client(s) 2" in reason


def test_fewer_rounds_than_progress_says_is_incomplete():
    reason = incomplete_reason(frame_of([[0.5, 0.6]]), 3, 2)
    assert reason and "round 1" in reason and "3 rounds" in reason


def test_clients_outside_the_partition_are_incomplete():
    assert "not in its partition" in incomplete_reason(frame_of([[0.5, 0.6, 0.7]]), 1, 2)


def test_rows_of_rounds_past_progress_are_ignored():
    assert incomplete_reason(frame_of([[0.5, 0.6], [0.7, None]]), 1, 2) is None


def test_a_doubled_accuracy_row_is_incomplete():
    frame = frame_of([[0.5, 0.6]])
    assert "two test accuracy rows" in incomplete_reason(pd.concat([frame, frame.iloc[:1]]), 1, 2)


# ---- damaged lines ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) - 25],  # torn last line
        lambda text: text + "garbage,line\n",
        lambda text: text + "\x00\x00\x00\n",
        lambda text: text.replace(",0.5,", ",zero point five,", 1),
        lambda text: text + ",".join(["x"] * 13) + "\n",
    ],
)
def test_damaged_lines_are_refused(tmp_path, damage):
    """Each damage is a reason to leave the run out (a tear that still parses leaves a client's row short)."""
    from pfedmoap_cli.report.runs import checked_run_metrics

    ws = Workspace(tmp_path / "ws")
    paths = fabricate(ws, "bad", [[0.5, 0.6]])
    assert checked_run_metrics(paths.root)[1] is None  # intact before the damage
    paths.metrics_csv.write_text(damage(paths.metrics_csv.read_text()))
    frame, reason = checked_run_metrics(paths.root)
    assert frame is None and reason and "\n" not in reason


def test_an_intact_file_reads_as_read_metrics_does(tmp_path):
    from pfedmoap_cli.artifacts.metrics import read_metrics

    paths = fabricate(Workspace(tmp_path / "ws"), "ok", [[0.5, 0.6], [0.7, 0.8]])
    pd.testing.assert_frame_equal(read_metrics_checked(paths.metrics_csv), read_metrics(paths.metrics_csv), check_dtype=False)


# ---- summarize_runs and the report command ----------------------------------------------------

@pytest.fixture
def three_runs(tmp_path) -> Workspace:
    """run-good (reported), run-torn (garbage line) and run-short (client 1 missing in round 1, no 'missing' row)."""
    ws = Workspace(tmp_path / "ws")
    fabricate(ws, "run-good", [[0.5, 0.6], [0.7, 0.8]])
    torn = fabricate(ws, "run-torn", [[0.5, 0.6], [0.7, 0.8]])
    torn.metrics_csv.write_text(torn.metrics_csv.read_text()[:-30])
    fabricate(ws, "run-short", [[0.5, 0.6], [0.9, None]])
    return ws


def test_summarize_runs_skips_damaged_runs_with_one_warning_each(three_runs):
    warnings: list[str] = []
    summary = summarize_runs(three_runs.runs_dir, warn=warnings.append)
    assert list(summary["run_id"]) == ["run-good"]
    assert summary["final_mean_acc"].iloc[0] == pytest.approx(75.0)
    assert len(warnings) == 2
    assert any("run run-torn" in w for w in warnings) and any("run run-short" in w for w in warnings)
    assert all("delete runs/" in w and "\n" not in w for w in warnings)


def test_report_through_the_installed_script(three_runs, tmp_path):
    if not SCRIPT.exists():
        pytest.skip(f"no installed console script at {SCRIPT}")
    env = {k: v for k, v in os.environ.items() if k not in {"PFEDMOAP_DEBUG", "PFEDMOAP_WORKSPACE"}}
    done = subprocess.run([str(SCRIPT), "--workspace", str(three_runs.root), "report"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("warning: run run-") for line in lines), done.stderr
    assert lines[0].startswith("warning: run run-short") and "client(s) 1" in lines[0]
    assert lines[1].startswith("warning: run run-torn")
    assert "| run-good |" in done.stdout and "run-torn" not in done.stdout and "run-short" not in done.stdout
