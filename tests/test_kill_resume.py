"""kill -9 at chosen moments, inside write windows too, then ``--resume``: the unbroken run's results.

The killed process is the real command line (``pfedmoap_cli.cli.app.main``)
in a subprocess; the kill comes from inside it, with SIGKILL, at the N-th
file replacement of the run: just before it (the complete temporary file is
on disk, the artifact not yet replaced) or just after it. Every artifact
write of the project ends in one ``os.replace``, so N counts write windows;
the points are spread over the whole run (first metrics, checkpoints of the
middle round, the last progress marker). After each kill the same command
with ``--resume`` runs to the end (unhooked), and metrics rows and checkpoint
tensors must equal an unbroken run's exactly.

A randomized, longer variant (more kill points, kills during the resume
too) runs with ``PFEDMOAP_LONG_FAULTS=1``.
"""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

PARTITION = ("partition", "--dataset", "synthetic", "--iid", "--clients", "3", "--seed", "2",
             "--option", "train_per_class=1", "--option", "test_per_class=1")
TRAIN = ("train", "--method", "pfedmoap", "--rounds", "3", "--local-epochs", "1", "--frac", "0.67", "--n-ctx", "2",
         "--batch-size", "8", "--lr", "0.05", "--backbone", "tiny-vit", "--pretrained", "none", "--device", "cpu",
         "--gating-dim", "16", "--gating-heads", "4", "--eval-batch-size", "64")
LONG = os.environ.get("PFEDMOAP_LONG_FAULTS") == "1"

#: Runs main() with SIGKILL at the N-th os.replace (before or after it); counts them when N is 0.
HOOKED_MAIN = textwrap.dedent(
    """
    import os, signal, sys
    target, when, counter = int(os.environ["KILL_AT"]), os.environ["KILL_WHEN"], os.environ.get("COUNT_FILE")
    real_replace, calls = os.replace, [0]
    def replace(src, dst, *args, **kwargs):
        calls[0] += 1
        if calls[0] == target and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst, *args, **kwargs)
        if counter:
            with open(counter, "w") as handle:
                handle.write(str(calls[0]))
        if calls[0] == target and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    from pfedmoap_cli.cli.app import main
    sys.argv = ["pfedmoap", *sys.argv[1:]]
    main()
    """
)


def pfedmoap(workspace: Path, *args: str, kill_at: int = -1, when: str = "before", count_file: Path | None = None):
    env = {k: v for k, v in os.environ.items() if k not in {"PFEDMOAP_DEBUG", "PFEDMOAP_WORKSPACE"}}
    env.update(OMP_NUM_THREADS="1", KILL_AT=str(kill_at), KILL_WHEN=when)
    if count_file is not None:
        env["COUNT_FILE"] = str(count_file)
    command = [sys.executable, "-c", HOOKED_MAIN, "--quiet", "--workspace", str(workspace), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def metric_rows(run_dir: Path) -> list[list[str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [row[1:] for row in csv.reader(handle)]  # run_id dropped


def checkpoint_tensors(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(run_dir)): load_file(str(p)) for p in sorted((run_dir / "checkpoints").rglob("*.safetensors"))}


def assert_same_results(actual: Path, expected: Path) -> None:
    assert metric_rows(actual) == metric_rows(expected)
    mine, theirs = checkpoint_tensors(actual), checkpoint_tensors(expected)
    assert sorted(mine) == sorted(theirs)
    for name, tensors in theirs.items():
        assert sorted(mine[name]) == sorted(tensors), name
        for key, tensor in tensors.items():
            assert torch.equal(mine[name][key], tensor), (name, key)
    assert (actual / "progress.json").read_text() == (expected / "progress.json").read_text()
    leftovers = [p for p in actual.rglob("*.tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The partition, an unbroken run, and how many file replacements that run makes."""
    workspace = tmp_path_factory.mktemp("kill") / "ws"
    done = pfedmoap(workspace, *PARTITION)
    assert done.returncode == 0, done.stderr
    done = pfedmoap(workspace, *TRAIN, "--run-id", "unbroken")
    assert done.returncode == 0, done.stderr
    # counted on a second run: the first one also filled the feature cache
    count = workspace.parent / "replacements"
    done = pfedmoap(workspace, *TRAIN, "--run-id", "counted", count_file=count)
    assert done.returncode == 0, done.stderr
    return workspace, int(count.read_text())


def kill_points(total: int) -> list[tuple[int, str]]:
    """Write windows spread over the run: the first, some in the middle, the last; before and after."""
    if LONG:
        rng = random.Random(13)
        return sorted({(rng.randint(1, total), rng.choice(["before", "after"])) for _ in range(24)})
    return [(1, "before"), (total // 2, "after"), (2 * total // 3, "before"), (total, "before")]


def test_a_run_killed_in_any_write_window_resumes_to_the_unbroken_results(reference):
    workspace, total = reference
    assert total >= 10, f"the run makes only {total} replacements: the kill points would not spread"
    for number, (kill_at, when) in enumerate(kill_points(total)):
        run_id = f"killed-{number}"
        killed = pfedmoap(workspace, *TRAIN, "--run-id", run_id, kill_at=kill_at, when=when)
        assert killed.returncode == -9, f"not killed at write {kill_at} ({when}): {killed.returncode} {killed.stderr[-2000:]}"
        if LONG:  # and once more while resuming
            again = pfedmoap(workspace, "train", "--run-id", run_id, "--resume", kill_at=2, when="before")
            assert again.returncode in (-9, 0), again.stderr[-2000:]
        started = (workspace / "runs" / run_id / "run.json").is_file()
        command = ("train", "--run-id", run_id, "--resume") if started else (*TRAIN, "--run-id", run_id)
        finished = pfedmoap(workspace, *command)
        assert finished.returncode == 0, f"write {kill_at} ({when}): {finished.stderr[-2000:]}"
        assert "Traceback" not in finished.stderr
        assert_same_results(workspace / "runs" / run_id, workspace / "runs" / "unbroken")
