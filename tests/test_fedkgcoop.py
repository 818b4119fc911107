"""FedKgCoOp: KgCoOp's loss (CE + lambda (1 - mean cos to the hand-written anchors)) on a federated context.

The anchors are computed here independently (tokenise the template prompts,
run the tiny CLIP's own ``encode_text``, normalise); lambda = 0 is PromptFL
exactly; the aggregate is (weighted or plain) FedAvg; the lock-step path
equals client by client.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pfedmoap_cli.methods.fedkgcoop  # noqa: F401  (registers the method)
from conftest import method_env

from pfedmoap_cli.artifacts.partition import load_partition, save_partition
from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
from pfedmoap_cli.data.sources import open_dataset
from pfedmoap_cli.engine.batched_round import has_batched_path, train_participants
from pfedmoap_cli.engine.workspace import Workspace
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.base import ClientJob, ClientResult, LocalTraining, MethodEnv, RoundView
from pfedmoap_cli.methods.fedkgcoop import FedKgCoOp, FedKgCoOpOptions
from pfedmoap_cli.methods.promptfl import PromptFL
from pfedmoap_cli.model.backbone import BackboneSpec, load_backbone
from test_batched_round import assert_states_close, federation_for, per_client_round  # the lock-step test's helpers

CLASSES = ["red_circle", "blue square", "green star", "yellow ring", "purple cross"]
N_CTX = 4


@pytest.fixture(scope="module")
def clip():
    return load_backbone(BackboneSpec("tiny-vit", None))


def make_env(clip, training: LocalTraining | None = None) -> MethodEnv:
    return method_env(clip, CLASSES, n_ctx=N_CTX, num_clients=3, training=training)


def data(clip, seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, clip.image_size, clip.image_size, generator=g)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    return [(images[i : i + 3], labels[i : i + 3]) for i in range(0, n, 3)]


def job(client_id, server_state, batches) -> ClientJob:
    return ClientJob(
        client_id=client_id, round_index=0, server_state=server_state, client_state=None, batches=lambda: iter(batches),
        num_examples=sum(len(y) for _, y in batches), generator=torch.Generator().manual_seed(client_id),
    )


def hand_anchors(clip, template: str) -> torch.Tensor:
    """h_c computed plainly: the template with each class name, CLIP's own encode_text, L2-normalised."""
    texts = [template.replace("{}", name.replace("_", " ")) for name in CLASSES]
    with torch.no_grad():
        features = clip.clip.encode_text(clip.tokenize(texts)).float()
    return features / features.norm(dim=-1, keepdim=True)


def test_loss_is_cross_entropy_plus_eight_times_one_minus_mean_cosine(clip):
    env = make_env(clip)
    method = FedKgCoOp(env)
    assert method.options.kg_weight == 8.0 and method.options.template == "a photo of a {}." and method.options.weighted
    g = torch.Generator().manual_seed(1)
    ctx = env.text_encoder.initial_context(g) + 0.3 * torch.randn(N_CTX, 64, generator=g)
    images, labels = data(clip, 2)[0]
    features = clip.encode_images(images)
    h = hand_anchors(clip, "a photo of a {}.")
    assert torch.allclose(method.anchors(), h, atol=1e-5)

    with torch.no_grad():
        text = env.text_encoder(ctx)
        by_hand_ce = F.cross_entropy(env.logit_scale * features @ text.t(), labels)
        cos = torch.stack([F.cosine_similarity(text[c], h[c], dim=0) for c in range(len(CLASSES))])
        by_hand = by_hand_ce + 8.0 * (1.0 - cos.mean())
        assert torch.allclose(method.loss(features, labels, text), by_hand, atol=1e-5)
        assert float(8.0 * (1.0 - cos.mean())) > 1e-2  # the anchor term is not negligible here
    # another template gives other anchors and another loss
    other = FedKgCoOp(env, FedKgCoOpOptions(template="a blurry drawing of the {}"))
    assert torch.allclose(other.anchors(), hand_anchors(clip, "a blurry drawing of the {}"), atol=1e-5)

    # the gradient holds the anchor term: d/dctx [CE + 8 (1 - mean cos)] differs from d/dctx CE
    ctx_param = ctx.clone().requires_grad_(True)
    (full,) = torch.autograd.grad(method.loss(features, labels, env.text_encoder(ctx_param)), ctx_param)
    (ce_only,) = torch.autograd.grad(F.cross_entropy(env.logit_scale * features @ env.text_encoder(ctx_param).t(), labels), ctx_param)
    (anchor_only,) = torch.autograd.grad(8.0 * (1 - (env.text_encoder(ctx_param) * h).sum(-1).mean()), ctx_param)
    assert (full - ce_only).abs().max() > 1e-4
    assert torch.allclose(full, ce_only + anchor_only, atol=1e-6)


def test_lambda_zero_is_promptfl_and_lambda_eight_is_not(clip):
    env = make_env(clip)
    start = PromptFL(env).initial_server_state(torch.Generator().manual_seed(0))
    batches = data(clip, 3)
    plain = PromptFL(env).train_client(job(0, start, batches))
    zero = FedKgCoOp(env, FedKgCoOpOptions(kg_weight=0)).train_client(job(0, start, batches))
    assert torch.equal(zero.upload["ctx"], plain.upload["ctx"]) and zero.train_loss == plain.train_loss
    eight = FedKgCoOp(env).train_client(job(0, start, batches))
    assert set(eight.upload) == {"ctx"} and eight.client_state == {}
    assert (eight.upload["ctx"] - plain.upload["ctx"]).abs().max() > 1e-4


def test_one_sgd_step_follows_the_hand_computed_gradient(clip):
    """One plain SGD step (no momentum, no decay) moves ctx by -lr * grad of the hand-written loss."""
    lr = 0.1
    env = make_env(clip, LocalTraining(local_epochs=1, lr=lr, momentum=0.0, weight_decay=0.0))
    start = PromptFL(env).initial_server_state(torch.Generator().manual_seed(4))
    batches = data(clip, 5, n=3)
    result = FedKgCoOp(env).train_client(job(0, start, batches))
    ctx = start["ctx"].clone().requires_grad_(True)
    images, labels = batches[0]
    features = clip.encode_images(images)
    text = env.text_encoder(ctx)
    h = hand_anchors(clip, "a photo of a {}.")
    loss = F.cross_entropy(env.logit_scale * features @ text.t(), labels) + 8.0 * (1 - F.cosine_similarity(text, h, dim=-1).mean())
    (grad,) = torch.autograd.grad(loss, ctx)
    assert torch.allclose(result.upload["ctx"], start["ctx"] - lr * grad, atol=1e-6)
    assert result.train_loss == pytest.approx(float(loss.detach()), abs=1e-5)


def test_aggregation_weighted_or_plain_and_scoring_with_the_global_prompt(clip):
    env = make_env(clip)
    start = PromptFL(env).initial_server_state(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(7)
    uploads = {2: torch.randn(N_CTX, 64, generator=g), 0: torch.randn(N_CTX, 64, generator=g)}
    results = {c: ClientResult(upload={"ctx": u}, client_state={}, num_examples=n, train_loss=0.0) for (c, u), n in zip(uploads.items(), (9, 3))}
    weighted = FedKgCoOp(env).aggregate(start, results, 0)["ctx"]
    plain = FedKgCoOp(env, FedKgCoOpOptions(weighted=False)).aggregate(start, results, 0)["ctx"]
    assert torch.allclose(weighted.double(), (9 * uploads[2].double() + 3 * uploads[0].double()) / 12, atol=1e-7)
    assert torch.allclose(plain.double(), (uploads[2].double() + uploads[0].double()) / 2, atol=1e-7)
    method = FedKgCoOp(env)
    assert set(method.client_download(start, 1, 0)) == {"ctx"}
    end = {"ctx": weighted}
    evaluator = method.evaluator(RoundView(0, frozenset({0, 2}), start, end, {}))
    features = clip.encode_images(data(clip, 8)[0][0])
    with torch.no_grad():
        expected = env.logit_scale * features @ env.text_encoder(weighted).t()
    assert torch.allclose(evaluator.logits(1, features), expected, atol=1e-5)


def test_options_are_checked():
    for bad in (dict(kg_weight=-1.0), dict(kg_weight=float("nan")), dict(template="no slot"), dict(template="{} and {}"), dict(weighted="yes")):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            FedKgCoOpOptions(**bad)
    assert FedKgCoOpOptions(kg_weight=4).kg_weight == 4.0


def test_batched_round_equals_client_by_client(tmp_path):
    """The lock-step hook against the engine's per-client path (as tests/test_batched_round.py does)."""
    assert has_batched_path(FedKgCoOp)
    workspace = Workspace(tmp_path)
    source = open_dataset("synthetic", Path("unused"), train_per_class=1, test_per_class=1)
    partition = build_partition(source, PartitionSettings("dirichlet", 4, seed=5, alpha=0.1), {"train_per_class": 1, "test_per_class": 1})
    path, _ = save_partition(partition, workspace.partitions_dir)
    partition, sha = load_partition(path)
    assert len({math.ceil(len(c.train) / 8) for c in partition.clients}) > 1  # clients run out of batches at different steps
    federation = federation_for((workspace, partition, sha), "fedkgcoop-batched", "eq-fedkgcoop", method="fedkgcoop")
    start = federation.initial_state()
    participants = [0, 1, 2, 3]
    expected = per_client_round(federation, 0, participants, start, {})
    batched = train_participants(federation, 0, participants, start, {})
    assert batched is not None
    for c in participants:
        assert_states_close(batched[c].upload, expected[c].upload)
        assert batched[c].client_state == {} == expected[c].client_state
        assert batched[c].train_loss == pytest.approx(expected[c].train_loss, abs=1e-5)
    assert_states_close(federation.method.aggregate(start, batched, 0), federation.method.aggregate(start, expected, 0))
