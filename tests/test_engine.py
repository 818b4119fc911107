"""The round loop's guarantees: seeded sampling, order independence, FedAvg."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pfedmoap_cli.artifacts.partition import load_partition, save_partition
from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
from pfedmoap_cli.data.sources import open_dataset
from pfedmoap_cli.engine.federation import Federation
from pfedmoap_cli.engine.session import open_session
from pfedmoap_cli.engine.settings import TrainSettings
from pfedmoap_cli.engine.workspace import RunPaths, Workspace
from pfedmoap_cli.methods.local_training import cosine_factor, weighted_average
from pfedmoap_cli.seeding import derive_seed, sample_clients


def test_sample_clients():
    assert sample_clients(10, 1.0, 0, 3) == list(range(10))
    picked = sample_clients(30, 0.25, 7, 2)
    assert len(picked) == 7 and picked == sorted(set(picked))  # floor(0.25 * 30) = 7
    assert sample_clients(30, 0.25, 7, 2) == picked
    assert sample_clients(30, 0.25, 8, 2) != picked or sample_clients(30, 0.25, 8, 3) != picked
    assert len(sample_clients(5, 0.01, 0, 0)) == 1  # at least one client
    assert len(sample_clients(20, 0.5, 0, 0)) == 10


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "a", 1) == derive_seed(0, "a", 1)
    assert len({derive_seed(s, "a", r) for s in (0, 1) for r in (0, 1)}) == 4
    assert 0 <= derive_seed(123, "x") < 2**63


def test_weighted_average_and_cosine():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.allclose(weighted_average([a, b], [1, 3]), (a + 3 * b) / 4)
    assert cosine_factor(0, 5) == 1.0
    assert cosine_factor(5, 5) == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    workspace = Workspace(root)
    source = open_dataset("synthetic", Path("unused"), train_per_class=3, test_per_class=2)
    partition = build_partition(source, PartitionSettings("dirichlet", 4, seed=2, alpha=0.5), {"train_per_class": 3, "test_per_class": 2})
    path, _ = save_partition(partition, workspace.partitions_dir)
    partition, sha = load_partition(path)
    settings = TrainSettings(method="promptfl", rounds=1, local_epochs=1, batch_size=8, n_ctx=2, backbone="tiny-vit", pretrained="none", device="cpu")
    return open_session(settings, partition, sha, Path("unused"), workspace.features_cache_dir, progress=False), workspace


def test_client_updates_do_not_depend_on_order(session):
    sess, workspace = session
    federation = Federation(sess, "order", RunPaths(workspace.run_dir("order")), progress=False)
    state = federation.initial_state()
    forward = {c: federation.train_client(c, 0, state, None) for c in range(4)}
    backward = {c: federation.train_client(c, 0, state, None) for c in reversed(range(4))}
    for c in range(4):
        assert torch.equal(forward[c].upload["ctx"], backward[c].upload["ctx"])
        assert forward[c].train_loss == backward[c].train_loss
    # the snapshot handed to clients is not modified by them
    assert torch.equal(state["ctx"], federation.initial_state()["ctx"])


def test_promptfl_aggregates_sample_weighted(session):
    sess, workspace = session
    federation = Federation(sess, "agg", RunPaths(workspace.run_dir("agg")), progress=False)
    state = federation.initial_state()
    results = {c: federation.train_client(c, 0, state, None) for c in range(4)}
    merged = sess.method.aggregate(state, results, 0)["ctx"]
    sizes = [len(sess.partition.clients[c].train) for c in range(4)]
    expected = sum(results[c].upload["ctx"].double() * sizes[c] for c in range(4)) / sum(sizes)
    assert torch.allclose(merged.double(), expected, atol=1e-6)
    assert [results[c].num_examples for c in range(4)] == sizes


def test_workspace_from_environment(cli, tmp_path, monkeypatch):
    import sys

    from pfedmoap_cli.cli.app import main

    monkeypatch.setenv("PFEDMOAP_WORKSPACE", str(tmp_path / "from-env"))
    monkeypatch.setattr(sys, "argv", ["pfedmoap", "-q", "partition", "--dataset", "synthetic", "--iid", "--clients", "2",
                                      "--option", "train_per_class=2", "--option", "test_per_class=1"])
    main()  # returns normally on success
    assert list((tmp_path / "from-env" / "partitions").glob("synthetic-iid-*.json"))


def test_run_id_binds_the_weights_not_only_their_name(tmp_path):
    """New weights under the same name (a regenerated shipped file, an overwritten checkpoint) give a new run id."""
    import os

    from pfedmoap_cli.engine.settings import default_run_id

    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"first weights")
    settings = TrainSettings(backbone="tiny-vit", pretrained=str(checkpoint))
    first = default_run_id(settings, "synthetic", "p" * 64)
    assert default_run_id(settings, "synthetic", "p" * 64) == first  # stable
    checkpoint.write_bytes(b"other weights")
    os.utime(checkpoint, ns=(1, 1))  # a different file even where the clock is coarse
    assert default_run_id(settings, "synthetic", "p" * 64) != first

    shipped = TrainSettings(backbone="micro-clip", pretrained="synthetic")
    random_init = TrainSettings(backbone="micro-clip", pretrained="none")
    assert default_run_id(shipped, "synthetic", "p" * 64) != default_run_id(random_init, "synthetic", "p" * 64)
