"""A run started on the local engine and resumed with ``--engine flower`` (Flower's real simulation runtime).

In its own module (not in test_flower_cli.py) so that pytest-xdist runs its
Ray simulation in parallel with that module's: each costs tens of seconds of
Ray start-up on a small machine, and together they were the suite's longest
chain. It also shows that the engine is not part of the run id.
"""

from __future__ import annotations

import sys

from conftest import require_flower

require_flower()  # without Flower: skipped, or failed where PFEDMOAP_REQUIRE_FLOWER=1 (CI)

from test_flower_cli import METHOD_FLAGS, TRAIN, in_process, run_paths, script  # noqa: E402
from test_flower_cli import workspace  # noqa: E402,F401  (the partition and the local reference runs)
from test_flower_runtime import assert_same_run_files  # noqa: E402


def test_a_local_run_resumes_on_flower(workspace):
    """Started locally and stopped after round 0, then ``--resume --engine flower`` with the same flags: the same run id."""
    flags = (*TRAIN, *METHOD_FLAGS["promptfl"])
    started = in_process(workspace, *flags, "--stop-after", "1")
    assert started.exit_code == 0 and "1/2 rounds complete" in started.stdout, started.stderr
    run_id = started.stdout.split("run ", 1)[1].split(":", 1)[0]
    assert run_id != "local-promptfl" and run_paths(workspace, run_id).run_json.is_file()
    runs_before = sorted(p.name for p in (workspace / "runs").iterdir())

    done = script(workspace, *flags, "--resume", "--engine", "flower", "--round-timeout", "60")
    sys.stderr.write(done.stderr)  # shown by pytest when a comparison below fails
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"run {run_id}: 2/2 rounds complete" in done.stdout, done.stdout
    assert sorted(p.name for p in (workspace / "runs").iterdir()) == runs_before  # no new run: the engine is not in the id
    assert_same_run_files(run_paths(workspace, run_id), run_paths(workspace, "local-promptfl"), rounds=2)
    # a finished run is not trained again, whichever engine is asked
    again = in_process(workspace, *flags, "--resume", "--engine", "flower")
    assert again.exit_code == 0 and "already complete" in again.stdout, again.stderr
