"""What every registered method sends a client, trains on and scores with (no per-method test code).

Like test_method_registry.py, the list comes from ``methods.base.method_names()``,
so a method registered later is held to the same contract as soon as it exists:

1. ``client_download`` and ``evaluation_download`` carry no other client's data
   beyond what the method documents (pFedMoAP's ``expert_ids``): no tensor with
   one row per client, no row of another client's entry of a per-client server
   table;
2. a client's local update, run from its download alone (as a node of another
   runtime runs it), is bit-identical to the engine's, and the engine's
   ``bytes_down``/``bytes_up`` are the tensors of that download and upload;
3. ``node_evaluator`` on a client's ``evaluation_download`` and its own state
   scores exactly as the federation-wide ``evaluator`` does, for a participant,
   a client that sat the round out and a client that never trained.

Each method runs two rounds on the synthetic world with the tiny ViT, 5 clients,
2 per round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd
import pytest
import torch

from pfedmoap_cli.artifacts.partition import load_partition, save_partition
from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
from pfedmoap_cli.data.sources import open_dataset
from pfedmoap_cli.engine.federation import Federation, clone_state
from pfedmoap_cli.engine.session import open_session
from pfedmoap_cli.engine.settings import TrainSettings
from pfedmoap_cli.engine.workspace import RunPaths, Workspace
from pfedmoap_cli.methods.base import ClientResult, RoundView, State, get_method, method_names, tensor_bytes
from pfedmoap_cli.seeding import sample_clients
from test_method_registry import TINY_MODEL_OPTIONS  # the options each method needs on the tiny towers

NUM_CLIENTS = 5
SEED = 1
#: With seed 1, rounds 0 and 1 sample {2, 4} then {2, 3} of the 5 clients: in round 1 client 2 trains
#: again (pFedMoAP: with an expert), 3 trains for the first time, 4 sits out, 0 and 1 never train.
PARTICIPANTS = ({2, 4}, {2, 3})
SAT_OUT, NEVER_TRAINED = 4, (0, 1)
TRAINING = [name for name in method_names() if get_method(name).trains]


def test_the_schedule_covers_every_kind_of_client():
    assert [set(sample_clients(NUM_CLIENTS, 0.5, SEED, t)) for t in (0, 1)] == list(PARTICIPANTS)
    assert SAT_OUT in PARTICIPANTS[0] - PARTICIPANTS[1]
    assert all(c not in PARTICIPANTS[0] | PARTICIPANTS[1] for c in NEVER_TRAINED)
    assert TRAINING and "pfedmoap" in TRAINING and len(TRAINING) < len(method_names())  # zsclip does not train


# ---- the federation ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    workspace = Workspace(tmp_path_factory.mktemp("downloads"))
    options = {"train_per_class": 2, "test_per_class": 1}
    source = open_dataset("synthetic", Path("unused"), **options)
    path, _ = save_partition(build_partition(source, PartitionSettings("iid", NUM_CLIENTS, seed=1), options), workspace.partitions_dir)
    partition, sha = load_partition(path)
    return workspace, partition, sha


@dataclass
class TwoRounds:
    """A method's federation after rounds 0 and 1, as the engine ran them."""

    federation: Federation
    initial: State
    servers: tuple[State, State]  # after round 0, after round 1
    clients: tuple[dict[int, State], dict[int, State]]  # client states after round 0, after round 1

    @property
    def method(self):
        return self.federation.method

    def view(self, round_index: int, with_client_states: bool = True) -> RoundView:
        start = self.initial if round_index == 0 else self.servers[round_index - 1]
        participants = frozenset(PARTICIPANTS[round_index]) if self.method.trains else frozenset()
        states = self.clients[round_index] if with_client_states else {}
        return RoundView(round_index, participants, start, self.servers[round_index], states)

    def metrics(self) -> pd.DataFrame:
        return pd.read_csv(self.federation.paths.metrics_csv)


@pytest.fixture(scope="module")
def two_rounds(world) -> Callable[[str], TwoRounds]:
    """Runs each method's two rounds once for the whole module."""
    workspace, partition, sha = world
    done: dict[str, TwoRounds] = {}

    def run(name: str) -> TwoRounds:
        if name not in done:
            settings = TrainSettings(
                method=name, rounds=2, local_epochs=1, frac=0.5, batch_size=4, n_ctx=2, lr=0.05, seed=SEED,
                backbone="tiny-vit", pretrained="none", device="cpu", method_options=dict(TINY_MODEL_OPTIONS.get(name, {})),
                batched=False,  # the rounds are replayed client by client below and compared bit for bit
            )
            session = open_session(settings, partition, sha, Path("unused"), workspace.features_cache_dir, progress=False)
            federation = Federation(session, name, RunPaths(workspace.run_dir(name)), progress=False)
            initial = federation.initial_state()
            server0, clients0, summary0 = federation.run_round(0, initial, {})
            server1, clients1, summary1 = federation.run_round(1, server0, clients0)
            if federation.method.trains:
                assert [set(summary0.participants), set(summary1.participants)] == list(PARTICIPANTS)
            done[name] = TwoRounds(federation, initial, (server0, server1), (clients0, clients1))
        return done[name]

    return run


# ---- 1. what a client is sent ------------------------------------------------------------
def leaks(download: Mapping[str, torch.Tensor], server_states, client_id: int, num_clients: int) -> list[str]:
    """Other clients' data in ``download`` that the contract does not allow.

    * a tensor with one row per client (first dimension ``num_clients``);
    * a row equal to another client's entry of a per-client server table (a
      tensor of ``server_states`` whose first dimension is ``num_clients``),
      unless that client is one of the download's documented ``expert_ids``.
      All-zero entries are placeholders of clients without data and not compared.
    """
    problems = []
    if num_clients > 1:
        problems += [f"{key} has one row per client {tuple(t.shape)}" for key, t in download.items() if t.dim() and t.shape[0] == num_clients]
    allowed = {client_id, *download.get("expert_ids", torch.empty(0, dtype=torch.int64)).tolist()}
    for state in server_states:
        for table_key, table in state.items():
            if table.dim() < 2 or table.shape[0] != num_clients:
                continue
            row_shape = table.shape[1:]
            for key, tensor in download.items():
                if tensor.dtype != table.dtype:
                    continue
                rows = [tensor] if tensor.shape == row_shape else list(tensor) if tensor.shape[1:] == row_shape else []
                for j in range(num_clients):
                    entry = table[j]
                    if j in allowed or not entry.any():
                        continue
                    if any(torch.equal(row.to(entry.device), entry) for row in rows):
                        problems.append(f"{key} holds client {j}'s {table_key} entry")
    return problems


def test_the_leak_rule_catches_a_whole_pool_and_a_foreign_row(two_rounds):
    run = two_rounds("pfedmoap")
    server = run.servers[0]  # clients 2 and 4 have pool entries
    assert leaks(dict(server), [server], 2, NUM_CLIENTS)  # sending the whole pool to anyone
    assert leaks({"pool": server["pool"]}, [server], 0, NUM_CLIENTS)
    # a single foreign prompt is caught unless the download says whose expert it is
    assert leaks({"ctx": server["ctx"], "experts": server["pool"][[4]], "expert_ids": torch.tensor([3])}, [server], 2, NUM_CLIENTS)
    assert not leaks({"ctx": server["ctx"], "experts": server["pool"][[4]], "expert_ids": torch.tensor([4])}, [server], 2, NUM_CLIENTS)
    assert leaks({"ctx": server["pool"][4]}, [server], 2, NUM_CLIENTS)
    assert not leaks({"ctx": server["pool"][2]}, [server], 2, NUM_CLIENTS)  # its own entry is its own data
    fedamp = two_rounds("fedamp").servers[0]
    assert leaks(dict(fedamp), [fedamp], 0, NUM_CLIENTS)


@pytest.mark.parametrize("method", TRAINING)
def test_client_downloads_carry_no_other_clients_data(two_rounds, method):
    run = two_rounds(method)
    for round_index, server in ((0, run.initial), (1, run.servers[0])):
        for client in range(NUM_CLIENTS):
            download = run.method.client_download(server, client, round_index)
            assert all(isinstance(t, torch.Tensor) for t in download.values())
            assert leaks(download, [server], client, NUM_CLIENTS) == [], (round_index, client)
            if "expert_ids" in download:  # documented: the client's own K experts, equal to their pool entries
                ids = download["expert_ids"].tolist()
                assert ids == run.method.experts_for(server, client, round_index) and client not in ids
                assert download["expert_ids"].dtype == torch.int64 and download["experts"].shape == (len(ids), *server["pool"].shape[1:])
                assert torch.equal(download["experts"], server["pool"][ids])
                assert len(ids) <= run.method.options.num_experts
    if method == "pfedmoap":  # the rule is not vacuous here: client 2 has an expert in round 1
        assert run.method.client_download(run.servers[0], 2, 1)["expert_ids"].tolist() == [4]


@pytest.mark.parametrize("method", method_names())
def test_evaluation_downloads_carry_no_other_clients_data_and_need_no_client_state(two_rounds, method):
    run = two_rounds(method)
    for round_index in (0, 1):
        view, server_side = run.view(round_index), run.view(round_index, with_client_states=False)
        for client in range(NUM_CLIENTS):
            download = run.method.evaluation_download(view, client)
            assert leaks(download, [view.start_state, view.end_state], client, NUM_CLIENTS) == [], (round_index, client)
            again = run.method.evaluation_download(server_side, client)  # the server does not hold client states
            assert set(again) == set(download) and all(torch.equal(again[k], download[k]) for k in download), (round_index, client)


# ---- 2. a local update on the download alone ---------------------------------------------
@pytest.mark.parametrize("method", TRAINING)
def test_training_on_the_download_alone_reproduces_the_engine(two_rounds, method):
    run = two_rounds(method)
    federation, model = run.federation, run.method
    start, before = run.servers[0], run.clients[0]
    participants = sorted(PARTICIPANTS[1])
    model.prepare_round(1, clone_state(start), tuple(participants))
    results: dict[int, ClientResult] = {}
    downloads = {}
    for client in reversed(participants):  # not the engine's order
        downloads[client] = model.client_download(start, client, 1)
        sent = clone_state(downloads[client])
        results[client] = model.train_client(federation.client_job(client, 1, downloads[client], before.get(client)))
        assert set(downloads[client]) == set(sent) and all(torch.equal(downloads[client][k], sent[k]) for k in sent)  # not mutated
    end = model.aggregate(start, results, 1)
    assert set(end) == set(run.servers[1])
    for key, value in end.items():
        assert torch.equal(value, run.servers[1][key]), key
    if not model.personalizes:
        for client in participants:
            expected = run.clients[1].get(client, {})
            assert set(results[client].client_state) == set(expected), client
            for key, value in results[client].client_state.items():
                assert torch.equal(value, expected[key]), (client, key)
    # the engine recorded the traffic of exactly these tensors
    metrics = run.metrics()
    train = metrics[(metrics["round"] == 1) & (metrics.split == "train")]
    for client in participants:
        rows = train[train.client_id == client].set_index("metric")["value"]
        assert rows["bytes_down"] == tensor_bytes(downloads[client]), client
        assert rows["bytes_up"] == tensor_bytes(results[client].upload), client

    # a node that never saw the server state or the round's shared work: a fresh method object
    node = type(model)(model.env, model.options)
    for client in participants:
        fresh = node.train_client(federation.client_job(client, 1, clone_state(downloads[client]), before.get(client)))
        assert set(fresh.upload) == set(results[client].upload)
        for key, value in fresh.upload.items():
            torch.testing.assert_close(value, results[client].upload[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", [name for name in TRAINING if get_method(name).personalizes])
def test_personalisation_on_the_evaluation_download_reproduces_the_engine(two_rounds, method):
    """A node fine-tunes from what it is sent for scoring (``evaluation_download``), as the engine does from the new server state."""
    run = two_rounds(method)
    view, start = run.view(1), run.servers[0]
    # every client's state after the round's local updates (what the engine fine-tunes from)
    own = dict(run.clients[0])
    run.method.prepare_round(1, clone_state(start), tuple(sorted(PARTICIPANTS[1])))
    for client in sorted(PARTICIPANTS[1]):
        job = run.federation.client_job(client, 1, run.method.client_download(start, client, 1), run.clients[0].get(client))
        trained = run.method.train_client(job).client_state
        if trained:
            own[client] = trained
    for client in range(NUM_CLIENTS):
        download = run.method.evaluation_download(view, client)
        state = run.federation.personalize_client(client, 1, download, own.get(client))
        assert set(state) == set(run.clients[1][client])
        for key, value in state.items():
            assert torch.equal(value, run.clients[1][client][key]), (client, key)


# ---- 3. scoring a client where its state lives -------------------------------------------
@pytest.mark.parametrize("method", method_names())
def test_node_evaluator_scores_like_the_federation_evaluator(two_rounds, method):
    run = two_rounds(method)
    session = run.federation.session
    for round_index in (0, 1):
        view = run.view(round_index)
        evaluator = run.method.evaluator(view)
        for client in range(NUM_CLIENTS):
            index = torch.tensor(session.partition.clients[client].test, dtype=torch.long)
            features = session.test_features[index]
            node = run.method.node_evaluator(round_index, client, run.method.evaluation_download(view, client), view.client_states.get(client))
            torch.testing.assert_close(node.logits(client, features), evaluator.logits(client, features), rtol=0, atol=1e-6)
            extra, expected = node.extra_metrics(client, features), evaluator.extra_metrics(client, features)
            assert list(extra) == list(expected) and extra == pytest.approx(expected, abs=1e-6), (round_index, client)
    if run.method.trains and not run.method.personalizes:  # every kind of client was compared
        assert set(run.clients[1]) <= PARTICIPANTS[0] | PARTICIPANTS[1] and SAT_OUT not in PARTICIPANTS[1]
