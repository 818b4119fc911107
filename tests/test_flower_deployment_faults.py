"""A SuperNode killed with SIGKILL during a round, on a real loopback deployment.

The federation finishes without it, records it as missing for that round, and
the restarted node (a new Flower node id) takes part again with the state it
kept on disk. A module of its own so that it runs beside the other deployment
test (pytest-xdist) instead of after it: both mostly wait on Flower's polling.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch

from conftest import require_flower

require_flower()  # without Flower: skipped, or failed where PFEDMOAP_REQUIRE_FLOWER=1 (CI)

from flower_harness import FlowerDeployment  # noqa: E402
from test_flower_deployment import COMMON, node_config, pfedmoap, world  # noqa: E402,F401  (world: the fixture)

from pfedmoap_cli.artifacts.checkpoint import load_checkpoint  # noqa: E402

# FedPer: its personal half changes in every local update and never leaves the
# node, so resuming from the kept state is visible in the numbers.
FAULT_TRAIN = (*COMMON, "--method", "fedper")


def test_a_killed_supernode_is_recorded_missing_and_rejoins_with_its_state(world):
    root, server, partition, nodes = world
    app = root / "app-3"
    pfedmoap(server, *FAULT_TRAIN, "--rounds", "3", "--engine", "flower", "--round-timeout", "60", "--write-flower-app", str(app))
    with FlowerDeployment(root / "flower-3") as flower:
        flower.start_superlink()
        flower.add_supernodes([node_config(c, nodes[c], partition) for c in range(3)])
        run = flower.start_run(app)
        progress = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            found = list((server / "runs").glob("*/progress.json"))
            fresh = [p for p in found if json.loads(p.read_text())["total_rounds"] == 3]
            if fresh and json.loads(fresh[0].read_text())["completed_rounds"] >= 1:
                progress = fresh[0]
                break
            time.sleep(0.2)
        assert progress is not None, "round 0 did not complete"
        flower.kill_supernode(2)  # during round 1
        old_id = flower.supernodes[2].node_id
        flower.restart_supernode(2)
        assert flower.supernodes[2].node_id != old_id
        result = flower.wait_run(run, timeout=600)
        assert result.returncode == 0 and "Exit Code: 201" not in result.output, result.output[-3000:]
    run_dir = progress.parent
    metrics = pd.read_csv(run_dir / "metrics.csv")
    missing = metrics[metrics.metric == "missing"]
    assert set(zip(missing["round"], missing.client_id, missing.split)) == {(1, 2, "train"), (1, 2, "test")}
    scored = metrics[(metrics.metric == "accuracy")]
    assert sorted(scored[scored["round"] == 1].client_id) == [0, 1]
    assert sorted(scored[scored["round"] == 2].client_id) == [0, 1, 2]
    trained = metrics[(metrics.split == "train") & (metrics.metric == "loss")]
    assert sorted(trained[trained["round"] == 2].client_id) == [0, 1, 2], "the restarted node takes part again"
    kept = nodes[2] / "runs" / run_dir.name / "checkpoints"
    assert (kept / "round-0000" / "client-0002.safetensors").is_file()
    assert not (kept / "round-0001" / "client-0002.safetensors").exists(), "nothing was kept for the round it missed"
    # It continued from the personal half it kept after round 0: its round-2
    # update, recomputed here from that checkpoint and the server's round-2
    # start state, is exactly what it saved, and an update from scratch is not.
    expected, from_scratch = recompute_round2_update(run_dir, nodes[2], kept / "round-0000" / "client-0002.safetensors")
    saved, _ = load_checkpoint(kept / "round-0002" / "client-0002.safetensors")
    assert saved.keys() == expected.keys() == {"personal"}
    assert torch.equal(saved["personal"], expected["personal"])
    assert not torch.equal(saved["personal"], from_scratch["personal"])
    assert json.loads((run_dir / "progress.json").read_text())["completed_rounds"] == 3


def recompute_round2_update(run_dir: Path, node: Path, kept: Path):
    """Client 2's round-2 update from ``kept`` (and, for contrast, from no state), in this process."""
    from pfedmoap_cli.artifacts.partition import load_partition
    from pfedmoap_cli.engine.federation import Federation
    from pfedmoap_cli.engine.run_record import partition_path_of, read_run_record, run_settings
    from pfedmoap_cli.engine.session import open_session
    from pfedmoap_cli.engine.workspace import RunPaths

    record = read_run_record(RunPaths(run_dir))
    partition, sha = load_partition(partition_path_of(record, run_dir.parent.parent))  # run_dir is <workspace>/runs/<id>
    session = open_session(run_settings(record), partition, sha, node / "data", node / "cache" / "features", progress=False)
    federation = Federation(session, record["run_id"], RunPaths(node / "scratch"), progress=False)
    start, _ = load_checkpoint(run_dir / "checkpoints" / "round-0001" / "global.safetensors")
    download = session.method.client_download(start, 2, 2)
    state, _ = load_checkpoint(kept)
    return federation.train_client(2, 2, download, state).client_state, federation.train_client(2, 2, download, None).client_state
