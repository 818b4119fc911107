"""A real Flower deployment on 127.0.0.1: one SuperLink and SuperNodes as separate processes.

Everything goes through what a user runs: ``pfedmoap partition``, ``pfedmoap
train --engine flower --write-flower-app DIR``, ``flower-superlink``,
``flower-supernode --node-config ...`` (one per client, each with its own
workspace) and ``flwr run DIR <connection> --stream``. Every process is started
and stopped by pid through :mod:`flower_harness` (also when a test fails).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import require_flower

require_flower()  # without Flower: skipped, or failed where PFEDMOAP_REQUIRE_FLOWER=1 (CI)

from flower_harness import FlowerDeployment  # noqa: E402

from pfedmoap_cli.artifacts.checkpoint import load_checkpoint  # noqa: E402

SCRIPT = Path(sys.executable).with_name("pfedmoap")
PARTITION = (
    "partition", "--dataset", "synthetic", "--clients", "3", "--seed", "1", "--pathological", "--shots", "2",
    "--option", "train_per_class=2", "--option", "test_per_class=1",
)
# Every round's checkpoints are kept: the nodes' states of each round are compared with the in-process run's.
COMMON = ("train", "--local-epochs", "1", "--n-ctx", "2", "--batch-size", "4", "--device", "cpu", "--keep-rounds", "all", "--per-client")
TRAIN = (*COMMON, "--method", "pfedmoap", "--method-option", "gating_dim=16", "--method-option", "gating_heads=4")


def pfedmoap(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PFEDMOAP_DEBUG", None)
    done = subprocess.run([str(SCRIPT), "--quiet", "--workspace", str(workspace), *args], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A server workspace with the partition, and a node workspace per client holding a copy of it."""
    if not SCRIPT.exists():
        pytest.skip(f"no installed console script at {SCRIPT}")
    root = tmp_path_factory.mktemp("deployment")
    server = root / "server"
    pfedmoap(server, *PARTITION)
    (partition,) = (server / "partitions").glob("*.json")
    nodes = []
    for client in range(3):
        node = root / f"node-{client}"
        (node / "partitions").mkdir(parents=True)
        shutil.copy(partition, node / "partitions" / partition.name)  # what an operator copies to each host
        nodes.append(node)
    return root, server, partition, nodes


def node_config(client: int, node: Path, partition: Path, **extra) -> dict:
    return {"partition-id": client, "workspace": str(node), "data-root": str(node / "data"), "partition": str(node / "partitions" / partition.name), **extra}


def reference_run(root: Path, partition: Path, rounds: int) -> Path:
    """The same run on the in-process engine; returns its run folder."""
    workspace = root / f"local-{rounds}"
    pfedmoap(workspace, *TRAIN, "--rounds", str(rounds), "--partition", str(partition))
    (run,) = (workspace / "runs").iterdir()
    return run


def values(metrics: Path) -> pd.DataFrame:
    frame = pd.read_csv(metrics)
    return frame.drop(columns=["run_id"]).sort_values(["round", "client_id", "split", "metric"]).reset_index(drop=True)


def same_checkpoint(a: Path, b: Path) -> bool:
    ta, _ = load_checkpoint(a)
    tb, _ = load_checkpoint(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_three_supernodes_on_loopback_equal_the_in_process_engine(world):
    root, server, partition, nodes = world
    app = root / "app-2"
    pfedmoap(server, *TRAIN, "--rounds", "2", "--engine", "flower", "--round-timeout", "120", "--write-flower-app", str(app))
    started = time.monotonic()
    reference = reference_run(root, partition, 2)
    local_seconds = time.monotonic() - started

    with FlowerDeployment(root / "flower-2") as flower:
        flower.start_superlink()
        flower.add_supernodes([node_config(c, nodes[c], partition) for c in range(3)])
        # Two bad nodes: an id outside the partition, and one that only runs another method.
        flower.add_supernodes([node_config(7, nodes[0], partition), node_config(1, nodes[1], partition, method="coop")])
        result = flower.run(app, timeout=600)
        assert result.ok, result.output[-3000:]
        assert "client id 7 is out of range" in result.output
        assert "accepts only 'coop'" in result.output
        assert "refused: client id 7 is out of range" in flower.supernodes[3].log()
        assert "refused: the server runs method 'pfedmoap'" in flower.supernodes[4].log()
    print(f"\nflwr run (2 rounds, 3 SuperNodes): {result.seconds:.1f} s; in-process: {local_seconds:.1f} s; ratio {result.seconds / local_seconds:.2f}")

    run_dir = server / "runs" / reference.name
    assert run_dir.is_dir(), "the deployed run has the in-process run's id (same settings, same partition)"
    # The client states are on the nodes: re-scoring here would treat every
    # client as never trained, so it is refused with the reason.
    refused = subprocess.run([str(SCRIPT), "--quiet", "--workspace", str(server), "evaluate", "--run", reference.name], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "SuperNodes" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    deployed = values(run_dir / "metrics.csv")
    pd.testing.assert_frame_equal(deployed, values(reference / "metrics.csv"), check_exact=True)
    down = deployed[deployed.metric == "bytes_down"]
    print("bytes per round (down/up, all clients):", deployed[deployed.metric.isin(["bytes_down", "bytes_up"])].groupby(["round", "metric"])["value"].sum().to_dict())
    assert (down["value"] > 0).all()
    for round_index in (0, 1):
        name = f"round-{round_index:04d}"
        assert same_checkpoint(run_dir / "checkpoints" / name / "global.safetensors", reference / "checkpoints" / name / "global.safetensors")
        assert not list((run_dir / "checkpoints" / name).glob("client-*")), "client states stay on the nodes"
        for client in range(3):
            kept = nodes[client] / "runs" / reference.name / "checkpoints" / name / f"client-{client:04d}.safetensors"
            assert same_checkpoint(kept, reference / "checkpoints" / name / f"client-{client:04d}.safetensors")
            others = [p.name for p in kept.parent.glob("client-*")]
            assert others == [kept.name], "a node keeps only its own client's state"
