"""The Flower runtime over an in-process grid (the real ClientApp, no Ray, no network).

:class:`~pfedmoap_cli.flower.server_app.FlowerGridRuntime` runs the server half
over ``tests/flower_inprocess.InProcessGrid``, whose nodes are the project's
real ClientApp, each with its own ``node_config``. Checked here:

1. every registered method (the list comes from ``method_names()``, so a method
   added later is held to it at once) writes exactly the run files of the
   local engine, metric for metric and tensor for tensor, with partial
   participation; every node gets its own train message with exactly its
   client's download, whose payload is the ``bytes_down`` recorded;
2. faults: a node that stops answering and comes back under a new node id, and
   a node whose reply arrives too late: the round goes on, the missing clients
   are recorded, the server aggregates exactly the updates that arrived, and
   the restarted node continues from the state it kept;
3. a restarted server resumes after its last complete round and ends where an
   uninterrupted local run ends;
4. nodes that cannot take part (client id out of range, another partition,
   other data, another method) are refused with their reason logged on both
   sides, are given no work, and the run goes on without their clients.

Nodes are added in a shuffled order, so Flower node ids never line up with
client ids (the server must use its seeded sampler and the handshake).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from conftest import require_flower

require_flower()  # without Flower: skipped, or failed where PFEDMOAP_REQUIRE_FLOWER=1 (CI)

from flower_inprocess import InProcessGrid  # noqa: E402  (imports flwr)

from pfedmoap_cli.artifacts.checkpoint import load_checkpoint  # noqa: E402
from pfedmoap_cli.artifacts.partition import load_partition, save_partition  # noqa: E402
from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition  # noqa: E402
from pfedmoap_cli.data.sources import open_dataset  # noqa: E402
from pfedmoap_cli.engine.federation import Federation  # noqa: E402
from pfedmoap_cli.engine.recorder import MISSING_METRIC  # noqa: E402
from pfedmoap_cli.engine.runner import IfExists, RunJob, execute_run  # noqa: E402
from pfedmoap_cli.engine.session import build_method, open_session  # noqa: E402
from pfedmoap_cli.engine.settings import TrainSettings, validate_settings  # noqa: E402
from pfedmoap_cli.engine.workspace import RunPaths, Workspace  # noqa: E402
from pfedmoap_cli.flower.client_app import make_client_app  # noqa: E402
from pfedmoap_cli.flower.node import NodeSetup  # noqa: E402
from pfedmoap_cli.flower.server import FlowerOptions  # noqa: E402
from pfedmoap_cli.flower.server_app import FlowerGridRuntime  # noqa: E402
from pfedmoap_cli.methods.base import RoundView, get_method, method_names  # noqa: E402
from pfedmoap_cli.seeding import sample_clients  # noqa: E402
from test_method_registry import TINY_MODEL_OPTIONS  # noqa: E402  (the options each method needs on the tiny towers)

NUM_CLIENTS = 5
#: Flower node ids are handed out in this client order (node 101 holds client 3, ...).
NODE_ORDER = (3, 0, 4, 1, 2)
SEED = 1
#: Seed 1, frac 0.5: rounds 0 and 1 sample {2, 4} then {2, 3}; 0 and 1 never train.
PARTICIPANTS = ({2, 4}, {2, 3})
#: Instant timeouts: the in-process grid answers at once, and a missing node must not make a test wait.
OPTIONS = FlowerOptions(round_timeout=1.0, join_timeout=0.0, query_timeout=1.0)


def settings_for(method: str, rounds: int = 2, frac: float = 0.5, seed: int = SEED) -> TrainSettings:
    return validate_settings(
        TrainSettings(
            method=method, rounds=rounds, local_epochs=1, frac=frac, batch_size=4, n_ctx=2, lr=0.05, seed=seed,
            backbone="tiny-vit", pretrained="none", device="cpu", amp=False, eval_batch_size=64,
            method_options=dict(TINY_MODEL_OPTIONS.get(method, {})),
            keep_rounds="all",  # the tests read every round's checkpoints back
            batched=False,  # a Flower node trains its client alone: bit-equal to the local per-client path
        )
    )


@dataclass
class World:
    """A workspace with one synthetic partition (the server's and, by default, every node's)."""

    workspace: Workspace
    data_root: Path
    partition_path: Path
    sha: str

    @property
    def partition(self):
        return load_partition(self.partition_path)[0]

    def grid(self, order=NODE_ORDER, first_id: int = 101, **node_config) -> tuple[InProcessGrid, dict[int, int]]:
        """A grid with one node per client (added in ``order``); returns it and client -> node id."""
        app = make_client_app(NodeSetup(0, self.workspace.root, self.data_root, partition=str(self.partition_path)))
        grid = InProcessGrid(app, next_id=first_id)
        return grid, {client: grid.add_node({"partition-id": client, **node_config}) for client in order}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("flower-runtime")
    workspace = Workspace(root / "ws")
    options = {"train_per_class": 1, "test_per_class": 1}
    source = open_dataset("synthetic", root / "data", **options)
    path, sha = save_partition(build_partition(source, PartitionSettings("iid", NUM_CLIENTS, seed=1), options), workspace.partitions_dir)
    return World(workspace, root / "data", path, sha)


# ---- reading what a run wrote ----------------------------------------------------------------
def metric_rows(paths: RunPaths) -> list[list[str]]:
    """metrics.csv as text cells, the run_id column dropped (floats are written with repr: exact)."""
    with open(paths.metrics_csv, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][0] == "run_id"
    return [row[1:] for row in rows]


def metrics_frame(paths: RunPaths):
    import pandas as pd

    return pd.read_csv(paths.metrics_csv, keep_default_na=False)


def checkpoints(paths: RunPaths) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """Every checkpoint of a run by its path in the run folder: tensors and metadata (run_id dropped)."""
    found = {}
    for path in sorted((paths.root / "checkpoints").rglob("*.safetensors")):
        tensors, meta = load_checkpoint(path)
        found[str(path.relative_to(paths.root))] = (tensors, {k: v for k, v in meta.items() if k != "run_id"})
    return found


def assert_same_run_files(actual: RunPaths, expected: RunPaths, rounds: int) -> None:
    """Same metric rows (all columns but run_id, exactly) and the same checkpoints, tensor for tensor."""
    assert metric_rows(actual) == metric_rows(expected)
    mine, theirs = checkpoints(actual), checkpoints(expected)
    assert sorted(mine) == sorted(theirs)
    for round_index in range(rounds):
        assert f"checkpoints/round-{round_index:04d}/global.safetensors" in mine
    for name, (tensors, meta) in theirs.items():
        assert mine[name][1] == meta, name
        assert set(mine[name][0]) == set(tensors), name
        for key, tensor in tensors.items():
            got = mine[name][0][key]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, (name, key)
            assert torch.equal(got, tensor), (name, key)
    assert json.loads(actual.progress_json.read_text()) == json.loads(expected.progress_json.read_text())


# ---- reading what the server sent --------------------------------------------------------------
def step_of(message) -> dict:
    """The ``round`` record of a train/evaluate message: round, client_id (and trained); {} for a query."""
    record = message.content.config_records.get("round")
    return {key: json.loads(str(value)) for key, value in record.items()} if record is not None else {}


def download_of(message) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.array(array.numpy(), copy=True)) for key, array in message.content.array_records["download"].items()}


def payload(message) -> int:
    """Bytes of tensor data in a message's download (elements x element size, headers not counted)."""
    return sum(array.numpy().nbytes for array in message.content.array_records["download"].values())


def messages(grid: InProcessGrid, kind: str, round_index: int | None = None) -> list:
    found = [m for m in grid.sent if m.metadata.message_type == kind]
    return [m for m in found if round_index is None or step_of(m)["round"] == round_index]


def by_client(found) -> dict[int, object]:
    clients = [step_of(m)["client_id"] for m in found]
    assert len(clients) == len(set(clients)), f"a client was sent two messages: {clients}"
    return dict(zip(clients, found))


def states_equal(a, b) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


class HookedRuntime:
    """A runtime calling ``hook(summary)`` after each round (the engine's on_round), e.g. to take a node down."""

    def __init__(self, inner, hook: Callable) -> None:
        self.inner, self.hook = inner, hook

    def __getattr__(self, name: str):  # the wrapped runtime's other attributes (e.g. its class flags)
        return getattr(self.inner, name)

    def open(self, job: RunJob):
        trainer = self.inner.open(job)

        def train(stop_after, on_round):
            def both(summary):
                on_round(summary)
                self.hook(summary)

            return trainer(stop_after, both)

        return train


# ---- 1. every method: the local engine's files, each node its own message ---------------------------
@dataclass
class Pair:
    """One method's run on the local engine and on Flower over the in-process grid."""

    local: RunPaths
    flower: RunPaths
    grid: InProcessGrid
    node_of: dict[int, int]


@pytest.fixture(scope="module")
def pairs(world) -> Callable[[str], Pair]:
    """Runs each method's two rounds on both runtimes once for the whole module."""
    done: dict[str, Pair] = {}

    def run(method: str) -> Pair:
        if method not in done:
            settings = settings_for(method)
            grid, node_of = world.grid()
            local = execute_run(world.workspace, world.data_root, settings, world.partition_path, run_id=f"local-{method}", progress=False)
            flower = execute_run(
                world.workspace, world.data_root, settings, world.partition_path, run_id=f"flower-{method}", progress=False,
                runtime=FlowerGridRuntime(grid, OPTIONS),
            )
            assert local.finished and flower.finished
            done[method] = Pair(local.paths, flower.paths, grid, node_of)
        return done[method]

    return run


def test_the_schedule_has_partial_participation():
    assert [set(sample_clients(NUM_CLIENTS, 0.5, SEED, t)) for t in (0, 1)] == list(PARTICIPANTS)
    assert sorted(NODE_ORDER) == list(range(NUM_CLIENTS)) and list(NODE_ORDER) != sorted(NODE_ORDER)


@pytest.mark.parametrize("method", method_names())
def test_flower_writes_the_local_engines_run_files(pairs, method):
    pair = pairs(method)
    assert_same_run_files(pair.flower, pair.local, rounds=2)
    frame = metrics_frame(pair.flower)
    assert MISSING_METRIC not in set(frame.metric)
    if get_method(method).trains:
        for round_index, participants in enumerate(PARTICIPANTS):
            train = frame[(frame["round"] == round_index) & (frame.split == "train")]
            assert set(train.client_id) == participants, round_index
    assert set(frame[frame.split == "test"].client_id) == set(range(NUM_CLIENTS))


@pytest.mark.parametrize("method", method_names())
def test_every_node_gets_its_own_messages_with_its_clients_download(pairs, world, method):
    pair = pairs(method)
    grid, node_of = pair.grid, pair.node_of
    settings = settings_for(method)
    _, model = build_method(settings, world.partition)
    server = [model.initial_state()] + [load_checkpoint(pair.local.global_checkpoint(t))[0] for t in (0, 1)]
    frame = metrics_frame(pair.flower)
    assert len({id(m) for m in grid.sent}) == len(grid.sent), "a message object was sent twice"
    assert len({id(m.content) for m in grid.sent}) == len(grid.sent), "two messages share their content"
    for round_index in (0, 1):
        train = by_client(messages(grid, "train", round_index))
        assert set(train) == (PARTICIPANTS[round_index] if model.trains else set())
        for client, message in train.items():
            assert message.metadata.dst_node_id == node_of[client], (round_index, client)
            expected = model.client_download(server[round_index], client, round_index)
            assert states_equal(download_of(message), expected), (round_index, client)
            row = frame[(frame["round"] == round_index) & (frame.client_id == client) & (frame.split == "train") & (frame.metric == "bytes_down")]
            assert row["value"].tolist() == [float(payload(message))], (round_index, client)
        if method == "pfedmoap":  # a client gets exactly its experts, so two participants' downloads differ
            ids = {client: download_of(m)["expert_ids"].tolist() for client, m in train.items()}
            for client, experts in ids.items():
                assert experts == model.experts_for(server[round_index], client, round_index) and client not in experts
            if round_index == 1:
                assert ids == {2: [4], 3: []}
                assert len({id(m.content.array_records["download"]) for m in train.values()}) == len(train)
        evaluate = by_client(messages(grid, "evaluate", round_index))
        assert set(evaluate) == set(range(NUM_CLIENTS))
        trained = PARTICIPANTS[round_index] if model.trains else set()
        view = RoundView(round_index, frozenset(trained), server[round_index], server[round_index + 1], {})
        for client, message in evaluate.items():
            assert message.metadata.dst_node_id == node_of[client]
            assert step_of(message)["trained"] is (client in trained), (round_index, client)
            assert states_equal(download_of(message), model.evaluation_download(view, client)), (round_index, client)
    queries = [m for m in grid.sent if m.metadata.message_type == "query"]
    assert sorted(m.metadata.dst_node_id for m in queries) == sorted(node_of.values())  # each node asked once


# ---- 2. faults: a node stops answering and restarts, a reply arrives too late ----------------------
#: Seed 2, frac 0.8, 5 clients, 3 rounds: {0, 1, 2, 4}, {0, 1, 3, 4}, {0, 2, 3, 4}.
FAULT_SEED, FAULT_FRAC = 2, 0.8
FAULT_PARTICIPANTS = ({0, 1, 2, 4}, {0, 1, 3, 4}, {0, 2, 3, 4})
#: Its node stops answering after round 0 (still listed: the timeout path) and is restarted,
#: under a new node id and with nothing in memory, before round 2 (the old id stays listed).
DOWN = 0
#: Its node trains in round 1 but the reply arrives after the server stopped waiting.
LATE = 1


@dataclass
class FaultRun:
    settings: TrainSettings
    paths: RunPaths
    grid: InProcessGrid
    old_node: int
    new_node: int
    log: str
    federation: Federation  # the same run computed here, client by client, to check against

    @property
    def model(self):
        return self.federation.method

    def global_state(self, round_index: int):
        if round_index < 0:
            return self.model.initial_state()
        return load_checkpoint(self.paths.global_checkpoint(round_index))[0]

    def client_state(self, round_index: int, client: int):
        """The client's state after ``round_index``, where that round's manifest says it lies (None: it has none)."""
        from pfedmoap_cli.artifacts.manifest import read_round_manifest

        ref = read_round_manifest(self.paths.round_dir(round_index)).client_states.get(client)
        return load_checkpoint(self.paths.root / "checkpoints" / ref.file)[0] if ref else None

    def reply(self, kind: str, round_index: int, client: int):
        """The one reply the server got to its ``kind`` message for ``client`` in ``round_index``."""
        (reply,) = [
            r for m, r in self.grid.received
            if m.metadata.message_type == kind and (step_of(m).get("round"), step_of(m).get("client_id")) == (round_index, client)
        ]
        return reply

    def upload(self, round_index: int, client: int):
        record = self.reply("train", round_index, client).content.array_records["upload"]
        return {key: torch.from_numpy(np.array(array.numpy(), copy=True)) for key, array in record.items()}


FAULT_METHODS = ["promptfl", "coop", "pfedmoap"]  # FedAvg of the answering uploads; a client's own state; both


@pytest.fixture(scope="module")
def fault_runs(world, tmp_path_factory) -> Callable[[str], FaultRun]:
    done: dict[str, FaultRun] = {}

    def run(method: str) -> FaultRun:
        if method in done:
            return done[method]
        settings = settings_for(method, rounds=3, frac=FAULT_FRAC, seed=FAULT_SEED)
        grid, node_of = world.grid()
        restarted = {}

        def faults(summary) -> None:
            if summary.round_index == 0:
                grid.silent.add(node_of[DOWN])
                grid.late.add((node_of[LATE], "train"))
            elif summary.round_index == 1:
                grid.late.clear()
                # restarted under a new id, while the SuperLink still lists the old one (as Flower does for a while)
                restarted["node"] = grid.add_node({"partition-id": DOWN})

        log = io.StringIO()
        with redirect_stderr(log):
            outcome = execute_run(
                world.workspace, world.data_root, settings, world.partition_path, run_id=f"faults-{method}", progress=False,
                runtime=HookedRuntime(FlowerGridRuntime(grid, OPTIONS), faults),
            )
        sys.stderr.write(log.getvalue())
        assert outcome.finished and outcome.completed_rounds == 3
        partition = world.partition
        session = open_session(settings, partition, world.sha, world.data_root, world.workspace.features_cache_dir, progress=False)
        scratch = RunPaths(tmp_path_factory.mktemp(f"scratch-{method}"))
        done[method] = FaultRun(settings, outcome.paths, grid, node_of[DOWN], restarted["node"], log.getvalue(), Federation(session, "scratch", scratch, progress=False))
        return done[method]

    return run


def test_the_fault_schedule():
    assert [set(sample_clients(NUM_CLIENTS, FAULT_FRAC, FAULT_SEED, t)) for t in range(3)] == list(FAULT_PARTICIPANTS)
    assert all(DOWN in p for p in FAULT_PARTICIPANTS) and LATE in FAULT_PARTICIPANTS[0] and LATE in FAULT_PARTICIPANTS[1]


@pytest.mark.parametrize("method", FAULT_METHODS)
def test_missing_clients_are_recorded_and_the_run_goes_on(fault_runs, method):
    run = fault_runs(method)
    frame = metrics_frame(run.paths)
    missing = frame[frame.metric == MISSING_METRIC]
    assert sorted(zip(missing["round"], missing.split, missing.client_id)) == [(1, "test", DOWN), (1, "train", DOWN), (1, "train", LATE)]
    assert (missing["value"] == 1.0).all() and (missing.num_examples == 0).all()
    assert "round 1: missing in training [0, 1], in evaluation [0]" in run.log
    assert f"client {DOWN} moved from node {run.old_node} to node {run.new_node} (a restarted SuperNode)" in run.log
    for round_index, participants in enumerate(FAULT_PARTICIPANTS):
        rows = frame[frame["round"] == round_index]
        answered = participants - ({DOWN, LATE} if round_index == 1 else set())
        for metric in ("loss", "bytes_down", "bytes_up"):
            assert set(rows[(rows.split == "train") & (rows.metric == metric)].client_id) == answered, (round_index, metric)
        scored = set(range(NUM_CLIENTS)) - ({DOWN} if round_index == 1 else set())
        assert set(rows[(rows.split == "test") & (rows.metric == "accuracy")].client_id) == scored, round_index
    # the node that stopped answering was sent its round-1 messages (it was still listed) and nothing after
    sent_to_old = sorted((m.metadata.message_type, step_of(m)["round"]) for m in run.grid.sent if m.metadata.dst_node_id == run.old_node and m.metadata.message_type != "query")
    assert sent_to_old == [("evaluate", 0), ("evaluate", 1), ("train", 0), ("train", 1)]
    sent_to_new = sorted((m.metadata.message_type, step_of(m).get("round")) for m in run.grid.sent if m.metadata.dst_node_id == run.new_node)
    assert sent_to_new == [("evaluate", 2), ("query", None), ("train", 2)]
    assert not run.paths.client_checkpoint(1, DOWN).exists()
    if run.model.trains and method != "promptfl":  # methods with a client state keep one per client that has one
        assert run.paths.client_checkpoint(0, DOWN).exists() and run.paths.client_checkpoint(2, DOWN).exists()


@pytest.mark.parametrize("method", FAULT_METHODS)
def test_the_server_aggregates_exactly_the_updates_that_arrived(fault_runs, method):
    run = fault_runs(method)
    federation, model = run.federation, run.model
    start = run.global_state(0)
    answered = sorted(FAULT_PARTICIPANTS[1] - {DOWN, LATE})
    results = {}
    for client in answered:  # each recomputed here from its round-0 state and its download
        result = federation.train_client(client, 1, model.client_download(start, client, 1), run.client_state(0, client))
        assert states_equal(result.upload, run.upload(1, client)), client
        results[client] = result
    # what the node sent back is what the server aggregated (its uploads and example counts)
    replies = {c: run.reply("train", 1, c).content.metric_records["result"] for c in answered}
    assert {c: int(r["num_examples"]) for c, r in replies.items()} == {c: results[c].num_examples for c in answered}
    expected = model.aggregate(start, results, 1)
    assert states_equal(run.global_state(1), expected)
    if method == "promptfl":  # FedAvg over the clients that answered, weighted by their examples
        weights = torch.tensor([float(results[c].num_examples) for c in answered])
        by_hand = sum(w * results[c].upload["ctx"] for w, c in zip(weights, answered)) / weights.sum()
        torch.testing.assert_close(run.global_state(1)["ctx"], by_hand, rtol=0, atol=1e-6)
        late = federation.train_client(LATE, 1, model.client_download(start, LATE, 1), run.client_state(0, LATE))
        with_late = model.aggregate(start, {**results, LATE: late}, 1)
        assert not torch.allclose(with_late["ctx"], run.global_state(1)["ctx"])  # the test can tell the late update apart


@pytest.mark.parametrize("method", FAULT_METHODS)
def test_a_late_update_is_not_used_by_its_node_either(fault_runs, method):
    """The server did not aggregate the late client's round-1 update, so its node scores and keeps its round-0 state."""
    run = fault_runs(method)
    evaluate = by_client(messages(run.grid, "evaluate", 1))
    assert {c: step_of(m)["trained"] for c, m in evaluate.items()} == {c: c in FAULT_PARTICIPANTS[1] - {DOWN, LATE} for c in evaluate}
    before = run.client_state(0, LATE)
    if method == "promptfl":
        assert before is None and run.client_state(1, LATE) is None
        return
    trained = run.federation.train_client(LATE, 1, run.model.client_download(run.global_state(0), LATE, 1), before).client_state
    assert not states_equal(trained, before)  # it did train: keeping that state would show
    assert states_equal(run.client_state(1, LATE), before)
    assert states_equal(run.client_state(2, LATE), before)  # it sat round 2 out
    # scored from its round-0 state and what the server sent it for scoring
    download = download_of(evaluate[LATE])
    evaluator = run.model.node_evaluator(1, LATE, download, before)
    (score,) = run.federation.score_clients(evaluator, [LATE])
    frame = metrics_frame(run.paths)
    row = frame[(frame["round"] == 1) & (frame.client_id == LATE) & (frame.split == "test")].set_index("metric")["value"]
    assert row["accuracy"] == score.accuracy and row["loss"] == score.loss


@pytest.mark.parametrize("method", FAULT_METHODS)
def test_the_restarted_node_continues_from_the_state_it_kept(fault_runs, method):
    run = fault_runs(method)
    model = run.model
    (message,) = [m for m in messages(run.grid, "train", 2) if step_of(m)["client_id"] == DOWN]
    assert message.metadata.dst_node_id == run.new_node
    assert states_equal(download_of(message), model.client_download(run.global_state(1), DOWN, 2))
    kept = run.client_state(0, DOWN)  # it missed round 1: its newest state is round 0's
    result = run.federation.train_client(DOWN, 2, download_of(message), kept)
    assert states_equal(result.upload, run.upload(2, DOWN))
    if result.client_state:
        assert states_equal(result.client_state, run.client_state(2, DOWN))
    if method == "coop":  # starting afresh would show
        fresh = run.federation.train_client(DOWN, 2, download_of(message), None)
        assert not states_equal(fresh.client_state, run.client_state(2, DOWN))


def test_a_late_first_update_leaves_no_state_behind(world):
    settings = settings_for("coop")  # rounds 0 and 1: {2, 4}, {2, 3}; client 3 trains for the first time in round 1
    grid, node_of = world.grid()

    def late(summary):
        if summary.round_index == 0:
            grid.late.add((node_of[3], "train"))

    outcome = execute_run(
        world.workspace, world.data_root, settings, world.partition_path, run_id="late-first-update", progress=False,
        runtime=HookedRuntime(FlowerGridRuntime(grid, OPTIONS), late),
    )
    assert outcome.finished
    frame = metrics_frame(outcome.paths)
    assert ((frame["round"] == 1) & (frame.client_id == 3) & (frame.metric == MISSING_METRIC)).sum() == 1
    # scored without a state of its own (as a client that never trained), so it must keep none
    assert not outcome.paths.client_checkpoint(1, 3).exists()


# ---- 3. a restarted server resumes after its last complete round ------------------------------------
@pytest.mark.parametrize("method", ["pfedmoap", "promptfl-ft"])
def test_a_restarted_server_resumes_and_ends_like_an_uninterrupted_run(pairs, world, method):
    settings = settings_for(method)
    grid, _ = world.grid()
    first = execute_run(
        world.workspace, world.data_root, settings, world.partition_path, run_id=f"restart-{method}", progress=False, stop_after=1,
        runtime=FlowerGridRuntime(grid, OPTIONS),
    )
    assert (first.completed_rounds, first.finished) == (1, False)
    assert {int(row[4]) for row in metric_rows(first.paths)[1:]} == {0}
    # a new server process (and new node processes, under new node ids, their disks kept)
    grid2, node_of2 = world.grid(order=(1, 4, 0, 2, 3), first_id=201)
    assert not set(node_of2.values()) & set(grid.nodes)
    second = execute_run(
        world.workspace, world.data_root, settings, world.partition_path, run_id=f"restart-{method}", progress=False,
        if_exists=IfExists.RESUME, runtime=FlowerGridRuntime(grid2, OPTIONS),
    )
    assert second.finished and second.last_round.round_index == 1
    assert {step_of(m).get("round") for m in grid2.sent} == {None, 1}  # round 0 was not run again
    assert_same_run_files(second.paths, pairs(method).local, rounds=2)


# ---- 4. nodes that cannot take part are refused, given no work, and the run goes on --------------------
def write_image_folder(root: Path, extra: int = 0) -> Path:
    """Three classes of 15 tiny images (flat layout: 12 train, 3 test each); ``extra`` more in the first class."""
    from PIL import Image

    for c, name in enumerate(("cat", "dog", "owl")):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(15 + (extra if c == 0 else 0)):
            Image.new("RGB", (8, 8), (80 * c, 15 * i % 256, 40)).save(folder / f"{i:02d}.png")
    return root


BAD_NODES = {  # name: (node_config, client it claims, words of its reason)
    "out of range": ({"partition-id": 7}, 7, ("client id 7 is out of range", "5 clients")),
    "other partition": ({"partition-id": 2, "partition": "OTHER"}, 2, ("partition", "is not the server's", "sha256")),
    "other data": ({"partition-id": 3, "data-root": "OTHER_DATA"}, 3, ("data", "differs from the data this partition was made from")),
    "other method": ({"partition-id": 4, "method": "coop"}, 4, ("method 'promptfl'", "accepts only 'coop'")),
}


def test_nodes_that_cannot_take_part_are_refused_and_the_run_goes_on(tmp_path, capsys):
    workspace = Workspace(tmp_path / "ws")
    data = write_image_folder(tmp_path / "images")
    other_data = write_image_folder(tmp_path / "other-images", extra=1)
    source = open_dataset("imagefolder", data)
    assert open_dataset("imagefolder", other_data).fingerprint() != source.fingerprint()
    path, sha = save_partition(build_partition(source, PartitionSettings("iid", NUM_CLIENTS, seed=1), {}), workspace.partitions_dir)
    other, other_sha = save_partition(build_partition(source, PartitionSettings("iid", NUM_CLIENTS, seed=2), {}), tmp_path / "other", make_current=False)
    assert other_sha != sha

    grid = InProcessGrid(make_client_app(NodeSetup(0, workspace.root, data, partition=str(path))))
    good = {client: grid.add_node({"partition-id": client}) for client in (1, 0)}
    bad = {}
    for name, (config, client, _) in BAD_NODES.items():
        config = {k: {"OTHER": str(other), "OTHER_DATA": str(other_data)}.get(v, v) for k, v in config.items()}
        bad[name] = grid.add_node(config)
    settings = settings_for("promptfl", frac=1.0)
    capsys.readouterr()
    outcome = execute_run(workspace, data, settings, path, run_id="bad-nodes", progress=False, runtime=FlowerGridRuntime(grid, OPTIONS))
    err = capsys.readouterr().err
    assert outcome.finished

    server_lines = [line for line in err.splitlines() if line.startswith("pfedmoap server: ")]
    node_lines = [line for line in err.splitlines() if line.startswith("pfedmoap node ")]
    for name, (_, client, words) in BAD_NODES.items():
        (server_line,) = [line for line in server_lines if line.startswith(f"pfedmoap server: node {bad[name]} (client {client}) refused: ")]
        reason = server_line.split(" refused: ", 1)[1]
        for word in words:
            assert word in reason, (name, word, reason)
        assert f"pfedmoap node (client {client}): refused: {reason}" in node_lines, (name, node_lines)
        # asked once which client it holds, then never given work
        assert [m.metadata.message_type for m in grid.sent if m.metadata.dst_node_id == bad[name]] == ["query"], name
    assert len(node_lines) == len(BAD_NODES)
    assert "pfedmoap server: starting without a node for clients [2, 3, 4]; they are recorded as missing until one joins" in server_lines

    frame = metrics_frame(outcome.paths)
    assert 7 not in set(frame.client_id)
    missing = frame[frame.metric == MISSING_METRIC]
    assert sorted(zip(missing["round"], missing.split, missing.client_id)) == sorted(
        (r, split, c) for r in (0, 1) for split in ("test", "train") for c in (2, 3, 4)
    )
    for round_index in (0, 1):
        rows = frame[(frame["round"] == round_index) & (frame.metric != MISSING_METRIC)]
        assert set(rows[rows.split == "train"].client_id) == set(good) == set(rows[rows.split == "test"].client_id)
    for client, node in good.items():
        kinds = sorted(m.metadata.message_type for m in grid.sent if m.metadata.dst_node_id == node)
        assert kinds == ["evaluate", "evaluate", "query", "train", "train"], client


def test_a_node_refuses_work_addressed_to_another_client(world, tmp_path):
    """A message for client 0 delivered to the node holding client 1 is refused, not trained on."""
    from pfedmoap_cli.engine.session import build_method
    from pfedmoap_cli.flower.protocol import RunInfo
    from pfedmoap_cli.flower.server import FlowerServer

    settings = settings_for("promptfl")
    grid, node_of = world.grid()
    _, method = build_method(settings, world.partition)
    lines: list[str] = []
    server = FlowerServer(
        grid, method, RunInfo.of("misaddressed", settings, world.sha), world.partition, RunPaths(tmp_path / "run"), OPTIONS, progress=False, log=lines.append
    )
    server.node_of = {0: node_of[1]}  # a wrong map: client 0's work goes to client 1's node
    assert server.train_round(0, method.initial_state(), [0]) == {}
    assert any("(client 1) refused: the server addressed client 0 to this node, which holds client 1" in line for line in lines), lines
    assert not (world.workspace.run_dir("misaddressed") / "checkpoints").exists()
