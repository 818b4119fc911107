"""Partition, checkpoint and metrics artifacts: round trips and tamper detection."""

from __future__ import annotations

import json

import pytest
import torch

from pfedmoap_cli.artifacts.atomic import sha256_file
from pfedmoap_cli.artifacts.checkpoint import load_checkpoint, save_checkpoint
from pfedmoap_cli.artifacts.metrics import MetricRow, append_metrics, read_metrics, truncate_metrics
from pfedmoap_cli.artifacts.partition import (
    PARTITION_SCHEMA,
    Partition,
    PartitionClient,
    load_partition,
    resolve_partition_path,
    save_partition,
)
from pfedmoap_cli.errors import ArtifactError


def make_partition() -> Partition:
    return Partition(
        dataset="synthetic",
        dataset_options={"seed": 0},
        dataset_fingerprint="ab" * 32,
        class_names=("red circle", "blue square"),
        scheme="dirichlet",
        params={"alpha": 0.5, "num_clients": 2, "seed": 1},
        clients=(
            PartitionClient(0, (0, 2), (1,), None, {0: 2}, {1: 1}),
            PartitionClient(1, (1, 3), (0, 2), "photo", {1: 2}, {0: 1, 1: 1}),
        ),
    )


def test_partition_round_trip_and_identity(tmp_path):
    partition = make_partition()
    path, sha = save_partition(partition, tmp_path)
    assert path.name.startswith("synthetic-dirichlet-") and path.name.endswith(".json")
    assert sha == sha256_file(path)
    loaded, loaded_sha = load_partition(path)
    assert loaded == partition
    assert loaded_sha == sha
    # Same content -> same file name and bytes; the current pointer follows.
    path2, sha2 = save_partition(partition, tmp_path)
    assert (path2, sha2) == (path, sha)
    assert resolve_partition_path(tmp_path, None) == path
    assert resolve_partition_path(tmp_path, path.stem) == path


def test_partition_tampering_is_detected(tmp_path):
    path, sha = save_partition(make_partition(), tmp_path)
    data = json.loads(path.read_text())
    data["clients"][0]["train"].append(99)
    path.write_text(json.dumps(data))
    _, new_sha = load_partition(path)
    assert new_sha != sha  # a run bound to the old sha refuses this file


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d.update(schema="pfedmoap.partition/0"), "schema"),
        (lambda d: d.pop("class_names"), "class_names"),
        (lambda d: d["clients"][0].update(train=[1, 1]), "repeats"),
        (lambda d: d["clients"][1].update(client_id=5), "id"),
        (lambda d: d["clients"][0].update(test=["a"]), "non-index"),
    ],
)
def test_malformed_partitions_are_refused(tmp_path, mutate, needle):
    path, _ = save_partition(make_partition(), tmp_path)
    data = json.loads(path.read_text())
    assert data["schema"] == PARTITION_SCHEMA
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=needle):
        load_partition(path)


def test_partition_not_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_partition(bad)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_partition(tmp_path / "missing.json")


def test_checkpoint_round_trip_and_corruption(tmp_path):
    path = tmp_path / "round-0000" / "global.safetensors"
    tensors = {"ctx": torch.randn(4, 8), "gate.weight": torch.randn(3, 3)}
    save_checkpoint(path, tensors, {"method": "promptfl", "round": 0})
    loaded, meta = load_checkpoint(path)
    assert set(loaded) == set(tensors)
    for name in tensors:
        assert torch.equal(loaded[name], tensors[name])
    assert meta["method"] == "promptfl" and meta["round"] == "0" and meta["schema"].startswith("pfedmoap.checkpoint/")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ArtifactError, match="corrupt"):
        load_checkpoint(path)
    assert not list(path.parent.glob("*.tmp"))  # atomic writes leave no temporaries


def test_metrics_append_and_truncate(tmp_path):
    path = tmp_path / "metrics.csv"

    def rows(round_index):
        return [MetricRow("r", "promptfl", "synthetic", "s", 0, round_index, c, "", "test", "accuracy", 0.25 * c, 10) for c in range(3)]

    append_metrics(path, rows(0))
    append_metrics(path, rows(1))
    append_metrics(path, rows(2))
    frame = read_metrics(path)
    assert len(frame) == 9 and sorted(frame["round"].unique()) == [0, 1, 2]
    assert frame["value"].tolist()[:3] == [0.0, 0.25, 0.5]
    truncate_metrics(path, 0)
    frame = read_metrics(path)
    assert sorted(frame["round"].unique()) == [0]
