"""PromptFolio: logits s f [(1 - theta) t(G) + theta t(L)]^T (mixture not re-normalised), G federated, L private.

Checked against plain computations written here: the evaluator's logits, the
theta = 0 / theta = 1 ends (PromptFL / CoOp), the hand-computed SGD step of G
and L, what is sent and kept, FedAvg of G only, and the lock-step path.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pfedmoap_cli.methods.promptfolio  # noqa: F401  (registers the method)
from conftest import method_env

from pfedmoap_cli.artifacts.partition import load_partition, save_partition
from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
from pfedmoap_cli.data.sources import open_dataset
from pfedmoap_cli.engine.batched_round import has_batched_path, train_participants
from pfedmoap_cli.engine.workspace import Workspace
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.base import ClientJob, LocalTraining, MethodEnv, RoundView
from pfedmoap_cli.methods.coop import CoOp, train_prompt
from pfedmoap_cli.methods.promptfl import PromptFL
from pfedmoap_cli.methods.promptfolio import PromptFolio, PromptFolioOptions
from pfedmoap_cli.model.backbone import BackboneSpec, load_backbone
from pfedmoap_cli.seeding import torch_generator
from test_batched_round import assert_states_close, federation_for, per_client_round  # the lock-step test's helpers

CLASSES = ["red circle", "blue square", "green star", "yellow ring", "purple cross"]
N_CTX = 4


@pytest.fixture(scope="module")
def clip():
    return load_backbone(BackboneSpec("tiny-vit", None))


def make_env(clip, training: LocalTraining | None = None) -> MethodEnv:
    return method_env(clip, CLASSES, n_ctx=N_CTX, num_clients=4, training=training)


def data(clip, seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, clip.image_size, clip.image_size, generator=g)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    return [(images[i : i + 3], labels[i : i + 3]) for i in range(0, n, 3)]


def job(client_id, server_state, client_state, batches, round_index: int = 0) -> ClientJob:
    return ClientJob(
        client_id=client_id, round_index=round_index, server_state=server_state, client_state=client_state,
        batches=lambda: iter(batches), num_examples=sum(len(y) for _, y in batches), generator=torch.Generator().manual_seed(client_id),
    )


def by_hand(env, features, g_ctx, l_ctx, theta):
    """s f [(1 - theta) t(G) + theta t(L)]^T with each t normalised and the mixture left as it is."""
    with torch.no_grad():
        t_g, t_l = env.text_encoder(g_ctx), env.text_encoder(l_ctx)
        assert torch.allclose(t_g.norm(dim=-1), torch.ones(len(CLASSES)), atol=1e-5)
        return env.logit_scale * features @ ((1 - theta) * t_g + theta * t_l).t()


def test_a_round_sends_g_keeps_l_averages_g_and_scores_with_the_unnormalised_mixture(clip):
    env = make_env(clip)
    method = PromptFolio(env)
    assert method.options.theta == 0.4
    start = method.initial_state()
    # L_0 is its own draw: the second draw of the seed's "init" stream, after G's
    stream = torch_generator(env.seed, "init")
    g0, l0 = env.text_encoder.initial_context(stream), env.text_encoder.initial_context(stream)
    assert torch.equal(start["ctx"], g0) and torch.equal(start["local_init"], l0) and not torch.equal(g0, l0)

    batches = {0: data(clip, 0), 2: data(clip, 1, n=3)}
    for c in range(4):
        assert set(method.client_download(start, c, 0)) == {"ctx"}  # G only; no local context goes down
    results = {c: method.train_client(job(c, method.client_download(start, c, 0), None, batches[c])) for c in batches}
    for c, result in results.items():
        assert set(result.upload) == {"ctx"} and set(result.client_state) == {"local_ctx"}
        assert not torch.equal(result.client_state["local_ctx"], l0) and not torch.equal(result.upload["ctx"], g0)  # both trained
    end = method.aggregate(start, results, 0)
    assert set(end) == {"ctx", "local_init"} and torch.equal(end["local_init"], l0)
    fedavg = (6 * results[0].upload["ctx"].double() + 3 * results[2].upload["ctx"].double()) / 9
    assert torch.allclose(end["ctx"].double(), fedavg, atol=1e-7)

    states = {c: r.client_state for c, r in results.items()}
    view = RoundView(0, frozenset(batches), start, end, states)
    evaluator = method.evaluator(view)
    for c in range(4):
        assert set(method.evaluation_download(view, c)) == {"ctx"}
    features = clip.encode_images(data(clip, 9)[0][0])
    for c, local in ((0, states[0]["local_ctx"]), (2, states[2]["local_ctx"]), (1, l0), (3, l0)):  # 1, 3 never trained: L_0
        expected = by_hand(env, features, end["ctx"], local, 0.4)
        assert torch.allclose(evaluator.logits(c, features), expected, atol=1e-5), c
    # not re-normalised: the mixed class vectors are shorter than 1, and a re-normalised mixture scores differently
    with torch.no_grad():
        mixed = 0.6 * env.text_encoder(end["ctx"]) + 0.4 * env.text_encoder(states[0]["local_ctx"])
    assert float(mixed.norm(dim=-1).max()) < 1 - 1e-3
    renormalised = env.logit_scale * features @ F.normalize(mixed, dim=-1).t()
    assert not torch.allclose(evaluator.logits(0, features), renormalised, atol=1e-3)


def test_theta_zero_is_promptfl_and_theta_one_is_coop(clip):
    env = make_env(clip)
    start = PromptFolio(env).initial_state()
    batches = data(clip, 3)
    features = clip.encode_images(data(clip, 4)[0][0])
    g = torch.Generator().manual_seed(5)
    G, L = torch.randn(N_CTX, 64, generator=g) * 0.3, torch.randn(N_CTX, 64, generator=g) * 0.3
    view = RoundView(0, frozenset({1}), start, {"ctx": G, "local_init": start["local_init"]}, {1: {"local_ctx": L}})

    zero = PromptFolio(env, PromptFolioOptions(theta=0))
    promptfl = PromptFL(env).evaluator(RoundView(0, frozenset(), {}, {"ctx": G}, {}))
    assert torch.equal(zero.evaluator(view).logits(1, features), promptfl.logits(1, features))
    trained = zero.train_client(job(0, zero.client_download(start, 0, 0), None, batches))
    plain = PromptFL(env).train_client(job(0, {"ctx": start["ctx"]}, None, batches))
    assert torch.allclose(trained.upload["ctx"], plain.upload["ctx"], atol=1e-6)  # G_k is PromptFL's update

    one = PromptFolio(env, PromptFolioOptions(theta=1))
    coop = CoOp(env).evaluator(RoundView(0, frozenset(), {}, {"init_ctx": start["local_init"]}, {1: {"ctx": L}}))
    assert torch.equal(one.evaluator(view).logits(1, features), coop.logits(1, features))
    trained = one.train_client(job(0, one.client_download(start, 0, 0), None, batches))
    local, _ = train_prompt(CoOp(env), job(0, {}, None, batches), start["local_init"])
    assert torch.allclose(trained.client_state["local_ctx"], local, atol=1e-6)  # L_k is CoOp's update from L_0


def test_one_sgd_step_of_g_and_l_follows_the_hand_computed_gradients(clip):
    lr, theta = 0.1, 0.4
    env = make_env(clip, LocalTraining(local_epochs=1, lr=lr, momentum=0.0, weight_decay=0.0))
    method = PromptFolio(env)
    start = method.initial_state()
    batches = data(clip, 6, n=3)
    g = torch.Generator().manual_seed(8)
    own_l = start["local_init"] + 0.2 * torch.randn(N_CTX, 64, generator=g)  # a client that trained before
    result = method.train_client(job(0, method.client_download(start, 0, 1), {"local_ctx": own_l}, batches, round_index=1))
    G, L = start["ctx"].clone().requires_grad_(True), own_l.clone().requires_grad_(True)
    images, labels = batches[0]
    features = clip.encode_images(images)
    logits = env.logit_scale * features @ ((1 - theta) * env.text_encoder(G) + theta * env.text_encoder(L)).t()
    loss = F.cross_entropy(logits, labels)
    grad_g, grad_l = torch.autograd.grad(loss, [G, L])
    assert grad_g.abs().max() > 1e-4 and grad_l.abs().max() > 1e-4
    assert torch.allclose(result.upload["ctx"], start["ctx"] - lr * grad_g, atol=1e-6)
    assert torch.allclose(result.client_state["local_ctx"], own_l - lr * grad_l, atol=1e-6)
    assert result.train_loss == pytest.approx(float(loss.detach()), abs=1e-5)


def test_theta_is_checked():
    for bad in (-0.1, 1.5, float("nan"), True, "x"):
        with pytest.raises(ConfigError, match="theta"):
            PromptFolioOptions(theta=bad)
    assert PromptFolioOptions(theta=1).theta == 1.0


def test_batched_round_equals_client_by_client(tmp_path):
    """The lock-step hook against the engine's per-client path, with clients with and without an L_k."""
    assert has_batched_path(PromptFolio)
    workspace = Workspace(tmp_path)
    source = open_dataset("synthetic", Path("unused"), train_per_class=1, test_per_class=1)
    partition = build_partition(source, PartitionSettings("dirichlet", 4, seed=5, alpha=0.1), {"train_per_class": 1, "test_per_class": 1})
    path, _ = save_partition(partition, workspace.partitions_dir)
    partition, sha = load_partition(path)
    assert len({math.ceil(len(c.train) / 8) for c in partition.clients}) > 1  # clients run out of batches at different steps
    federation = federation_for((workspace, partition, sha), "promptfolio-batched", "eq-promptfolio", method="promptfolio")
    start = federation.initial_state()
    first = per_client_round(federation, 0, [0, 2], start, {})
    states = {c: r.client_state for c, r in first.items()}
    server = federation.method.aggregate(start, first, 0)
    participants = [0, 1, 2, 3]
    expected = per_client_round(federation, 1, participants, server, states)
    batched = train_participants(federation, 1, participants, server, states)
    assert batched is not None
    for c in participants:
        assert_states_close(batched[c].upload, expected[c].upload)
        assert_states_close(batched[c].client_state, expected[c].client_state)
        assert batched[c].train_loss == pytest.approx(expected[c].train_loss, abs=1e-5)
    assert_states_close(federation.method.aggregate(server, batched, 1), federation.method.aggregate(server, expected, 1))
