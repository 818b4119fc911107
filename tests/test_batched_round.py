"""Lock-step rounds: the batched path equals client by client, and isolates each client's RNG."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pfedmoap_cli.artifacts.partition import load_partition, save_partition
from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
from pfedmoap_cli.data.sources import open_dataset
from pfedmoap_cli.engine import federation as federation_module
from pfedmoap_cli.engine.batched_round import has_batched_path, run_local_epochs_batched, train_participants
from pfedmoap_cli.engine.client_data import ClientTrainImages, epoch_batches
from pfedmoap_cli.engine.federation import Federation
from pfedmoap_cli.engine.session import open_session
from pfedmoap_cli.engine.settings import TrainSettings
from pfedmoap_cli.engine.workspace import RunPaths, Workspace
from pfedmoap_cli.methods.base import ClientJob, FederatedMethod, LocalTraining
from pfedmoap_cli.methods.coop import train_prompt, train_prompts_batched
from pfedmoap_cli.methods.fedprox import proximal_term
from pfedmoap_cli.methods.promptfl import PromptFL

METHODS = ("promptfl", "coop", "fedprox", "fedper")
CLIENTS = 4
BATCH_SIZE = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A workspace and a partition whose clients hold different numbers of training batches."""
    root = tmp_path_factory.mktemp("batched")
    workspace = Workspace(root)
    source = open_dataset("synthetic", Path("unused"), train_per_class=1, test_per_class=1)
    options = {"train_per_class": 1, "test_per_class": 1}
    # 28, 22, 29 and 29 training images: 4, 3, 4 and 4 batches of up to 8, the last ones partial.
    partition = build_partition(source, PartitionSettings("dirichlet", CLIENTS, seed=5, alpha=0.1), options)
    path, _ = save_partition(partition, workspace.partitions_dir)
    partition, sha = load_partition(path)
    batch_counts = {math.ceil(len(c.train) / BATCH_SIZE) for c in partition.clients}
    assert len(batch_counts) > 1, "the test needs clients that run out of batches at different steps"
    return workspace, partition, sha


_SESSIONS: dict[str, object] = {}


def federation_for(world, key: str, run: str, **overrides) -> Federation:
    """A federation on the session ``key`` (a method name, or a name with ``method`` among ``overrides``).

    Overrides of ``method`` and ``image_pipeline`` make the session; the others
    (``batched``) are applied to the federation only.
    """
    workspace, partition, sha = world
    made = {k: overrides.pop(k) for k in ("method", "image_pipeline") if k in overrides}
    if key not in _SESSIONS:
        settings = TrainSettings(
            method=made.get("method", key), rounds=2, local_epochs=2, batch_size=BATCH_SIZE, n_ctx=2, lr=0.05, backbone="tiny-vit",
            pretrained="none", device="cpu", image_pipeline=made.get("image_pipeline", "pil"), batched=True,
        )
        _SESSIONS[key] = open_session(settings, partition, sha, Path("unused"), workspace.features_cache_dir, progress=False)
    federation = Federation(_SESSIONS[key], run, RunPaths(workspace.run_dir(run)), progress=False)
    if overrides:
        federation.settings = replace(federation.settings, **overrides)
    return federation


def per_client_round(federation: Federation, round_index: int, participants, start_state, client_states):
    """The round's local updates as Federation.run_round makes them, client by client."""
    method = federation.method
    return {
        c: federation.train_client(c, round_index, method.client_download(start_state, c, round_index), client_states.get(c))
        for c in participants
    }


def assert_states_close(left: dict, right: dict) -> None:
    assert set(left) == set(right)
    for key in left:
        assert left[key].shape == right[key].shape, key
        assert torch.allclose(left[key], right[key], atol=1e-5, rtol=0), (key, (left[key] - right[key]).abs().max())


@pytest.mark.parametrize("method", METHODS)
def test_batched_round_equals_client_by_client(world, method):
    federation = federation_for(world, method, f"eq-{method}")
    start = federation.initial_state()
    # Round 0 client by client gives some clients a personal state (CoOp, FedPer): round 1
    # then mixes clients with and without one.
    first = per_client_round(federation, 0, [0, 2], start, {})
    states = {c: r.client_state for c, r in first.items() if r.client_state}
    server = federation.method.aggregate(start, first, 0)
    participants = list(range(CLIENTS))

    expected = per_client_round(federation, 1, participants, server, states)
    batched = train_participants(federation, 1, participants, server, states)

    assert batched is not None and list(batched) == participants
    for c in participants:
        assert_states_close(batched[c].upload, expected[c].upload)
        assert_states_close(batched[c].client_state, expected[c].client_state)
        assert batched[c].train_loss == pytest.approx(expected[c].train_loss, abs=1e-5)
        assert batched[c].num_examples == expected[c].num_examples
        assert (batched[c].bytes_down, batched[c].bytes_up) == (expected[c].bytes_down, expected[c].bytes_up)
    assert_states_close(federation.method.aggregate(server, batched, 1), federation.method.aggregate(server, expected, 1))


def test_batched_round_with_the_tensor_image_pipeline(world):
    """The default pipeline (tensor augmentation from each job's own generator) is lock-step safe too."""
    federation = federation_for(world, "promptfl-tensor", "tensor", method="promptfl", image_pipeline="tensor")
    start = federation.initial_state()
    participants = list(range(CLIENTS))
    expected = per_client_round(federation, 0, participants, start, {})
    batched = train_participants(federation, 0, participants, start, {})
    for c in participants:
        assert_states_close(batched[c].upload, expected[c].upload)
        assert batched[c].train_loss == pytest.approx(expected[c].train_loss, abs=1e-5)


def test_batched_prompts_keep_each_clients_start_and_regulariser(world):
    """Different start contexts and proximal anchors per client: each row follows its own client's loss."""
    federation = federation_for(world, "promptfl", "rows")
    method, clients = federation.method, [0, 1, 3]
    generator = torch.Generator().manual_seed(11)
    width = method.env.text_encoder.width
    starts = [torch.randn(2, width, generator=generator) * 0.02 for _ in clients]
    anchors = [torch.randn(2, width, generator=generator) * 0.02 for _ in clients]
    mu = 3.0

    def jobs():  # fresh jobs per path: a job's batches carry their own advancing random stream
        return [federation.client_job(c, 0, {}, None) for c in clients]

    ctxs, losses = train_prompts_batched(method, jobs(), starts, [proximal_term(a, mu) for a in anchors])
    for job, start, anchor, ctx, loss in zip(jobs(), starts, anchors, ctxs, losses):
        alone, alone_loss = train_prompt(method, job, start, extra_loss=proximal_term(anchor, mu))
        assert torch.allclose(ctx, alone, atol=1e-5, rtol=0)
        assert loss == pytest.approx(alone_loss, abs=1e-5)


def test_batched_round_does_not_depend_on_participant_order(world):
    federation = federation_for(world, "fedper", "order")
    start = federation.initial_state()
    forward = train_participants(federation, 0, [0, 1, 2, 3], start, {})
    backward = train_participants(federation, 0, [3, 2, 1, 0], start, {})
    assert list(backward) == [3, 2, 1, 0]
    for c in range(CLIENTS):
        assert torch.equal(forward[c].upload["ctx_shared"], backward[c].upload["ctx_shared"])
        assert torch.equal(forward[c].client_state["personal"], backward[c].client_state["personal"])
        assert forward[c].train_loss == backward[c].train_loss


def test_per_client_path_is_bit_identical_to_the_global_rng_path(world, monkeypatch):
    """RNG isolation changes no number: the result equals the one of batches drawing from the global RNG."""
    federation = federation_for(world, "promptfl", "bits")
    start = federation.initial_state()
    isolated = federation.train_client(1, 0, start, None)

    plain_epoch_batches = epoch_batches

    def global_rng_batches(*args, augment_seed=None, **kwargs):
        return plain_epoch_batches(*args, **kwargs)  # before isolation: augmentation from the global RNG

    monkeypatch.setattr(federation_module, "epoch_batches", global_rng_batches)
    shared = federation.train_client(1, 0, start, None)
    assert torch.equal(isolated.upload["ctx"], shared.upload["ctx"])
    assert isolated.train_loss == shared.train_loss


def epoch_images(batches) -> list[torch.Tensor]:
    return [images.clone() for images, _ in batches()]


def test_isolated_batches_are_those_of_a_freshly_seeded_global_rng(world):
    workspace, partition, sha = world
    session = _SESSIONS.get("promptfl") or federation_for(world, "promptfl", "rng").session
    transform = session.clip.train_transform()
    datasets = [
        ClientTrainImages(session.source, session.train_samples, partition.clients[c].train, transform) for c in (0, 1)
    ]

    def stream(c: int, isolated: bool):
        seed = 1000 + c
        if not isolated:
            torch.manual_seed(seed)
        return epoch_batches(datasets[c], 2, torch.Generator().manual_seed(c), torch.device("cpu"), augment_seed=seed if isolated else None)

    # Reference: each client alone on a freshly seeded global RNG, two epochs in a row.
    reference = []
    for c in (0, 1):
        batches = stream(c, isolated=False)
        reference.append(epoch_images(batches) + epoch_images(batches))
    assert not all(torch.equal(a, b) for a, b in zip(reference[0], reference[0][1:])), "augmentation should vary"

    # Lock step: the two isolated streams interleaved batch by batch, while the caller draws too.
    torch.manual_seed(7)
    caller_before = torch.get_rng_state()
    streams = [stream(c, isolated=True) for c in (0, 1)]
    got: list[list[torch.Tensor]] = [[], []]
    for _ in range(2):
        iterators = [iter(s()) for s in streams]
        live = [0, 1]
        while live:
            still = []
            for c in live:
                batch = next(iterators[c], None)
                if batch is not None:
                    got[c].append(batch[0].clone())
                    still.append(c)
            live = still
    assert torch.equal(torch.get_rng_state(), caller_before)  # the caller's stream did not move
    for c in (0, 1):
        assert len(got[c]) == len(reference[c])
        assert all(torch.equal(a, b) for a, b in zip(got[c], reference[c]))


# ---- the lock-step optimiser against plain torch.optim.SGD, client by client ----------------


class ListJob:
    """A stand-in ClientJob whose epoch is a fixed list of (inputs, labels)."""

    def __init__(self, batches):
        self._batches = batches

    def batches(self):
        return iter(self._batches)


def make_batches(sizes: list[int], seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=generator), torch.randint(0, 2, (n,), generator=generator)) for n in sizes]


def sample_loss(weights: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = features @ weights + bias
    return torch.nn.functional.cross_entropy(logits, labels)


def test_lock_step_sgd_equals_torch_sgd_per_client_and_leaves_idle_rows_alone():
    training = LocalTraining(local_epochs=3, lr=0.1, momentum=0.9, weight_decay=0.05)
    bias_lr = 0.03
    # Client 2 has no data: its row must come back exactly as it went in (no decay, no momentum).
    client_batches = [make_batches([4, 3, 2], 1), make_batches([5], 2), [], make_batches([2, 2], 3)]
    generator = torch.Generator().manual_seed(0)
    start_w = torch.randn(len(client_batches), 3, 2, generator=generator)
    start_b = torch.randn(len(client_batches), 2, generator=generator)

    weights = start_w.clone().requires_grad_(True)
    bias = start_b.clone().requires_grad_(True)
    encode_calls = []

    def encode(images):
        encode_calls.append(len(images))
        return images * 2.0  # a fixed "encoder": features carry no parameter

    def loss_fn(positions, features, labels):
        return torch.stack([sample_loss(weights[p], bias[p], f, y) for p, f, y in zip(positions, features, labels)])

    groups = [{"params": [weights], "lr": training.lr, "cosine": True}, {"params": [bias], "lr": bias_lr}]
    losses = run_local_epochs_batched([ListJob(b) for b in client_batches], groups, loss_fn, training, encode)

    # One encoder call per lock step: max over clients of their batch counts, per epoch.
    assert encode_calls == [11, 5, 2] * training.local_epochs

    for client, batches in enumerate(client_batches):
        w = start_w[client].clone().requires_grad_(True)
        b = start_b[client].clone().requires_grad_(True)
        optimizer = torch.optim.SGD(
            [{"params": [w], "lr": training.lr}, {"params": [b], "lr": bias_lr}],
            lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay,
        )
        last = 0.0
        for epoch in range(training.local_epochs):
            optimizer.param_groups[0]["lr"] = training.lr * 0.5 * (1 + math.cos(math.pi * epoch / training.local_epochs))
            total, seen = 0.0, 0
            for images, labels in batches:
                optimizer.zero_grad()
                loss = sample_loss(w, b, images * 2.0, labels)
                loss.backward()
                optimizer.step()
                total, seen = total + loss.item() * len(labels), seen + len(labels)
            last = total / max(seen, 1)
        assert torch.allclose(weights[client].detach(), w.detach(), atol=1e-6, rtol=0), client
        assert torch.allclose(bias[client].detach(), b.detach(), atol=1e-6, rtol=0), client
        assert losses[client] == pytest.approx(last, abs=1e-6)
    assert torch.equal(weights[2].detach(), start_w[2]) and torch.equal(bias[2].detach(), start_b[2])


def test_lock_step_refuses_parameters_without_a_client_dimension():
    shared = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="leading dimension of 2"):
        run_local_epochs_batched([ListJob([]), ListJob([])], [{"params": [shared]}], lambda *a: None, LocalTraining(), lambda x: x)


# ---- when there is no batched path -----------------------------------------------------------


class OwnUpdate(PromptFL):
    """A PromptFL variant with its own local update (as pFedPrompt): PromptFL's batched path is not its own."""

    name = "own-update-test"

    def train_client(self, job: ClientJob):
        return super().train_client(job)


class Declines(PromptFL):
    name = "declines-test"

    def train_clients_batched(self, jobs):
        return None


def test_without_a_batched_path_the_engine_trains_client_by_client(world):
    federation = federation_for(world, "promptfl", "none")
    start = federation.initial_state()
    env = federation.method.env
    assert FederatedMethod.train_clients_batched(federation.method, []) is None  # the hook's default
    assert has_batched_path(PromptFL) and not has_batched_path(OwnUpdate) and not has_batched_path(FederatedMethod)

    off = federation_for(world, "promptfl", "off", batched=False)
    assert train_participants(off, 0, [0, 1], start, {}) is None
    for method_class in (OwnUpdate, Declines):
        federation.method = method_class(env)
        assert train_participants(federation, 0, [0, 1], start, {}) is None
