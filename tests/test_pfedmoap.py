"""pFedMoAP: the gating maths against plain formulas, one SGD step, expert selection,
the evaluation rules of PROTOCOL.md section 3 step 5, and the CLI end to end."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from conftest import one_line_error
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.base import ClientJob, LocalTraining, MethodEnv, RoundView, tensor_bytes
from pfedmoap_cli.methods.pfedmoap import PFedMoAP, PFedMoAPOptions, select_experts
from pfedmoap_cli.model.backbone import BackboneSpec, load_backbone
from pfedmoap_cli.model.gating import GatingNetwork, mixture_logits, pool_features
from pfedmoap_cli.model.prompt import PromptTextEncoder

CLASSES = ["red circle", "blue square", "green star", "yellow ring"]
SMALL = dict(gating_dim=16, gating_heads=4)  # tiny models have D = 32


# ---- an independent, plain implementation of PROTOCOL.md section 2 ----------------------
def linear(layer_weight, layer_bias, x):
    return layer_weight @ x + layer_bias


def reference_mixture(image, experts, params, heads, sigma, lam, scale):
    """Loops over images, classes and heads; explicit softmax. Returns logits, T_MoE, attention."""
    batch, dim_in = image.shape
    num_experts, classes = experts.shape[:2]
    local = scale * torch.stack([torch.stack([image[b] @ experts[0, c] for c in range(classes)]) for b in range(batch)])
    if num_experts == 1:
        return local, None, None
    d_g = params["W_q.weight"].shape[0]
    stride = dim_in // d_g
    keep = [stride * j for j in range(d_g)]
    head_dim = d_g // heads
    logits = [[None] * classes for _ in range(batch)]
    moe = [[None] * classes for _ in range(batch)]
    attention = torch.zeros(batch, heads, classes, num_experts, dtype=image.dtype)
    for b in range(batch):
        query_in = image[b, keep]
        q = linear(params["W_q.weight"], params["W_q.bias"], query_in)
        for c in range(classes):
            keys = [linear(params["W_k.weight"], params["W_k.bias"], experts[e, c, keep]) for e in range(num_experts)]
            values = [linear(params["W_v.weight"], params["W_v.bias"], experts[e, c, keep]) for e in range(num_experts)]
            outs = []
            for h in range(heads):
                part = slice(h * head_dim, (h + 1) * head_dim)
                scores = [sigma * torch.dot(q[part], keys[e][part]) for e in range(num_experts)]
                top = max(float(s.detach()) for s in scores)
                exps = [torch.exp(s - top) for s in scores]
                total = sum(exps)
                weights = [x / total for x in exps]
                attention[b, h, c] = torch.stack(weights).detach()
                outs.append(sum(w * values[e][part] for e, w in enumerate(weights)))
            moe[b][c] = linear(params["W_o.weight"], params["W_o.bias"], torch.cat(outs))
            logits[b][c] = lam * local[b, c] + scale * torch.dot(query_in, moe[b][c])
    logits = torch.stack([torch.stack(row) for row in logits])
    moe = torch.stack([torch.stack(row) for row in moe])
    return logits, moe, attention


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize(
    "batch,classes,dim,d_g,heads,k",
    [(3, 4, 64, 32, 4, 3), (2, 5, 64, 8, 2, 1), (2, 3, 32, 16, 8, 0), (1, 2, 128, 16, 1, 3)],
)
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_gating_and_logits_match_plain_formulas(batch, classes, dim, d_g, heads, k, lam):
    g = torch.Generator().manual_seed(batch * 100 + classes * 10 + k)
    image = unit(torch.randn(batch, dim, generator=g, dtype=torch.float64))
    experts = unit(torch.randn(k + 1, classes, dim, generator=g, dtype=torch.float64))
    gating = GatingNetwork(dim, d_g, heads, scaling=10.0, generator=torch.Generator().manual_seed(7)).double()
    params = {name: p.detach() for name, p in gating.named_parameters()}
    logits, attention = mixture_logits(image, experts, gating, lam, logit_scale=14.3)
    ref_logits, ref_moe, ref_attention = reference_mixture(image, experts, params, heads, 10.0, lam, 14.3)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    if k == 0:
        assert attention is None  # plain local logits, no lambda factor
        return
    moe, attention_direct = gating(image, experts)
    assert moe.shape == (batch, classes, d_g) and attention.shape == (batch, heads, classes, k + 1)
    torch.testing.assert_close(moe, ref_moe, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attention, ref_attention, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attention_direct, attention)
    torch.testing.assert_close(attention.sum(-1), torch.ones(batch, heads, classes, dtype=torch.float64))


def test_pool_and_gating_shape_rules():
    x = torch.arange(64.0).reshape(2, 32)
    assert pool_features(x, 16).tolist() == x[:, ::2].tolist()
    assert pool_features(x, 4)[0].tolist() == [0.0, 8.0, 16.0, 24.0]
    with pytest.raises(ConfigError, match="gating_dim"):
        pool_features(x, 12)
    with pytest.raises(ConfigError, match="gating_heads"):
        GatingNetwork(32, 16, 3)
    # the paper's size: four Linear(128, 128) with bias
    assert sum(p.numel() for p in GatingNetwork(1024, 128, 8).parameters()) == 66_048


def test_gating_init_is_seeded_default_linear_init():
    state = torch.random.get_rng_state()
    a = GatingNetwork(32, 16, 4, generator=torch.Generator().manual_seed(3))
    b = GatingNetwork(32, 16, 4, generator=torch.Generator().manual_seed(3))
    c = GatingNetwork(32, 16, 4, generator=torch.Generator().manual_seed(4))
    bound = 1 / math.sqrt(16)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc), name
        assert pa.abs().max() <= bound and pa.abs().max() > 0.5 * bound
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded init leaves the global RNG alone


# ---- a tiny method environment -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    clip = load_backbone(BackboneSpec("tiny-vit", None, init_seed=0))
    encoder = PromptTextEncoder(clip, CLASSES, n_ctx=2)
    return clip, encoder


def make_method(tiny, num_clients=5, training=LocalTraining(local_epochs=1, lr=0.05), **options):
    clip, encoder = tiny
    env = MethodEnv(clip, encoder, tuple(CLASSES), num_clients, training, seed=11, device=torch.device("cpu"))
    return PFedMoAP(env, PFedMoAPOptions(**{**SMALL, **options}))


def pool_at_distances(base, distances, generator):
    """A pool with pool[0] = base and ||pool[j] - base||_F = distances[j]."""
    rows = [base]
    for d in distances[1:]:
        direction = torch.randn(base.shape, generator=generator)
        rows.append(base + d * direction / direction.norm())
    return torch.stack(rows)


def test_one_sgd_step_matches_plain_computation(tiny):
    clip, encoder = tiny
    method = make_method(tiny, num_experts=3, lam=0.5, gating_lr=0.3)
    g = torch.Generator().manual_seed(5)
    global_ctx = 0.02 * torch.randn(2, 64, generator=g)
    pool = pool_at_distances(0.02 * torch.randn(2, 64, generator=g), [0, 0.3, 0.1, 0.5, 0.2], g)
    server = {"ctx": global_ctx, "pool": pool, "pool_mask": torch.ones(5, dtype=torch.bool)}
    own_gating = {f"gating.{k}": v for k, v in method.new_gating(0).state_dict().items()}
    client_state = {"ctx": pool[0].clone(), "expert_ids": torch.tensor([1]), **own_gating}
    images = torch.randn(6, 3, clip.image_size, clip.image_size, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    download = method.client_download(server, 0, 4)
    job = ClientJob(0, 4, download, client_state, lambda: [(images, labels)], 6, torch.Generator().manual_seed(0))
    result = method.train_client(job)

    expected_ids = [2, 4, 1]  # nearest three, closest first
    # the client receives the global prompt and exactly its three experts' prompts, nothing else of the pool
    assert set(download) == {"ctx", "experts", "expert_ids"}
    assert torch.equal(download["ctx"], global_ctx)
    assert download["expert_ids"].dtype == torch.int64 and download["expert_ids"].tolist() == expected_ids
    assert download["experts"].shape == (3, 2, 64) and torch.equal(download["experts"], pool[expected_ids])
    assert tensor_bytes(download) == 4 * tensor_bytes({"c": global_ctx}) + 8 * 3
    assert result.client_state["expert_ids"].tolist() == expected_ids
    # plain computation: the prompt starts from the GLOBAL prompt, experts are constants
    ctx = global_ctx.clone().requires_grad_(True)
    params = {k[len("gating.") :]: v.clone().requires_grad_(True) for k, v in own_gating.items()}
    with torch.no_grad():
        experts = encoder(pool[expected_ids])
    features = clip.encode_images(images)
    stack = torch.cat([encoder(ctx).unsqueeze(0), experts])
    logits, _, _ = reference_mixture(features, stack, params, 4, 10.0, 0.5, clip.logit_scale)
    loss = -torch.log_softmax(logits, dim=1)[torch.arange(6), labels].mean()
    loss.backward()
    assert result.train_loss == pytest.approx(float(loss.detach()), rel=1e-5)
    wd = method.env.training.weight_decay
    # first SGD step with momentum: the buffer is the (decayed) gradient itself
    torch.testing.assert_close(result.client_state["ctx"], global_ctx - 0.05 * (ctx.grad + wd * global_ctx), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.upload["ctx"], result.client_state["ctx"])
    for name, p in params.items():
        expected = p.detach() - 0.3 * (p.grad + wd * p.detach())
        torch.testing.assert_close(result.client_state[f"gating.{name}"], expected, rtol=1e-4, atol=1e-7)
        assert not torch.equal(result.client_state[f"gating.{name}"], own_gating[f"gating.{name}"])
    # only the trained prompt goes back up: no gating, no expert
    assert set(result.upload) == {"ctx"} and result.upload["ctx"].shape == (2, 64) and result.upload["ctx"].dtype == torch.float32


def test_optimiser_groups(tiny, monkeypatch):
    """Prompt: the run's lr on the cosine schedule; gating: gating_lr, constant (PROTOCOL.md section 2)."""
    import pfedmoap_cli.methods.pfedmoap as module

    seen = []
    monkeypatch.setattr(module, "run_local_epochs", lambda batches, groups, *rest: seen.append(groups) or 0.0)
    method = make_method(tiny, num_experts=2, gating_lr=0.01)
    server = {"ctx": torch.zeros(2, 64), "pool": torch.randn(5, 2, 64), "pool_mask": torch.ones(5, dtype=torch.bool)}
    download = method.client_download(server, 0, 1)
    assert download["experts"].shape == (2, 2, 64)
    method.train_client(ClientJob(0, 1, download, None, lambda: [], 1, torch.Generator()))
    prompt, gating = seen[0]
    assert prompt["lr"] == method.env.training.lr and prompt["cosine"] is True and len(prompt["params"]) == 1
    assert gating["lr"] == 0.01 and not gating.get("cosine", False) and len(gating["params"]) == 8


def test_gradients_reach_only_local_prompt_and_gating(tiny):
    clip, encoder = tiny
    method = make_method(tiny, num_experts=2)
    g = torch.Generator().manual_seed(1)
    pool = 0.02 * torch.randn(5, 2, 64, generator=g)
    server = {"ctx": pool[0].clone(), "pool": pool, "pool_mask": torch.ones(5, dtype=torch.bool)}
    ids = method.experts_for(server, 0, 0)
    download = method.client_download(server, 0, 0)
    assert download["expert_ids"].tolist() == ids and torch.equal(download["experts"], pool[ids])
    experts = method.expert_features(download, 0)
    assert len(ids) == 2 and not experts.requires_grad and experts.grad_fn is None
    ctx = torch.nn.Parameter(pool[0].clone())
    gating = method.new_gating(0)
    features = clip.encode_images(torch.randn(3, 3, 32, 32, generator=g))
    logits, _ = mixture_logits(features, torch.cat([encoder(ctx).unsqueeze(0), experts]), gating, 0.5, clip.logit_scale)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gating.parameters())
    assert all(p.grad is None for p in clip.parameters())
    # lambda = 0: the prompt still learns through the local expert's key and value
    ctx.grad = None
    logits, _ = mixture_logits(features, torch.cat([encoder(ctx).unsqueeze(0), experts]), gating, 0.0, clip.logit_scale)
    logits.sum().backward()
    assert ctx.grad.abs().sum() > 0


# ---- expert selection ---------------------------------------------------------------------
def test_nearest_selection_returns_client_ids():
    # client 2 sits at 0; others at known distances; client 4 is closest but has no entry
    values = {0: 3.0, 1: -1.0, 2: 0.0, 3: 1.0, 4: 0.1, 5: 2.0, 6: -5.0}
    pool = torch.stack([torch.full((2, 3), v) for v in values.values()])
    available = torch.tensor([True, True, True, True, False, True, True])
    assert select_experts(pool, available, 2, 3, "nearest") == [1, 3, 5]  # 1 and 3 tie: lower id first
    assert select_experts(pool, available, 2, 1, "nearest") == [1]
    assert select_experts(pool, available, 2, 10, "nearest") == [1, 3, 5, 0, 6]  # fewer than K: all, never self
    assert select_experts(pool, available, 6, 2, "nearest") == [1, 2]
    assert select_experts(pool, available, 2, 0, "nearest") == []
    assert select_experts(pool, torch.tensor([False, False, True, False, False, False, False]), 2, 3, "nearest") == []


def test_random_selection_is_seeded_and_order_independent(tiny):
    method = make_method(tiny, num_clients=9, num_experts=3, expert_selection="random")
    state = {"pool": torch.randn(9, 2, 64), "pool_mask": torch.tensor([True] * 8 + [False])}
    forward = {c: method.experts_for(state, c, 3) for c in range(8)}
    backward = {c: method.experts_for(state, c, 3) for c in reversed(range(8))}
    assert forward == backward
    for c, ids in forward.items():
        assert len(ids) == 3 and c not in ids and 8 not in ids and len(set(ids)) == 3
    assert any(method.experts_for(state, c, 4) != forward[c] for c in range(8))  # a new draw each round
    assert method.experts_for({"pool": state["pool"], "pool_mask": torch.tensor([True, True] + [False] * 7)}, 0, 3) == [1]
    assert method.experts_for(state, 8, 3) == []  # no pool entry yet: first participation, no experts


def test_round_is_order_independent_and_cache_is_exact(tiny):
    clip, encoder = tiny
    method = make_method(tiny, num_experts=2)
    g = torch.Generator().manual_seed(2)
    pool = 0.02 * torch.randn(5, 2, 64, generator=g)
    server = {"ctx": 0.02 * torch.randn(2, 64, generator=g), "pool": pool, "pool_mask": torch.tensor([True, True, True, False, True])}
    images = torch.randn(4, 3, 32, 32, generator=g)
    labels = torch.tensor([0, 1, 2, 3])

    downloads = {c: method.client_download(server, c, 1) for c in (0, 3, 4)}

    def job(c):
        return ClientJob(c, 1, downloads[c], None, lambda: [(images, labels)], 4, torch.Generator().manual_seed(c))

    method.prepare_round(1, server, (0, 3, 4))
    assert sorted(method._cache.rows) == sorted({j for c in (0, 4) for j in method.experts_for(server, c, 1)})
    # the cache serves only the very prompts a client received: different prompts under the same ids are encoded afresh
    with torch.no_grad():
        cached = method.expert_features(downloads[0], 1)
        torch.testing.assert_close(cached, encoder.encode_many(downloads[0]["experts"]), rtol=1e-5, atol=1e-6)
        forged = {**downloads[0], "experts": downloads[0]["experts"] + 0.5 * unit(torch.randn(2, 2, 64, generator=g))}
        torch.testing.assert_close(method.expert_features(forged, 1), encoder.encode_many(forged["experts"]), rtol=1e-5, atol=1e-6)
        assert (method.expert_features(forged, 1) - cached).abs().max() > 1e-3
    a = {c: method.train_client(job(c)) for c in (0, 3, 4)}
    b = {c: method.train_client(job(c)) for c in (4, 3, 0)}
    uncached = make_method(tiny, num_experts=2, share_expert_features=False)
    uncached.prepare_round(1, server, (0, 3, 4))
    d = {c: uncached.train_client(job(c)) for c in (0, 3, 4)}
    for c in (0, 3, 4):
        for key, value in a[c].client_state.items():
            assert torch.equal(value, b[c].client_state[key]), (c, key)
            torch.testing.assert_close(value, d[c].client_state[key], rtol=1e-5, atol=1e-6)
    assert a[3].client_state["expert_ids"].numel() == 0  # first participation
    # what each client was sent: the global prompt, plus its two experts once it has a pool entry
    for c in (0, 3, 4):
        ids = method.experts_for(server, c, 1)
        assert len(ids) == (0 if c == 3 else 2) and c not in ids and 3 not in ids
        assert set(downloads[c]) == {"ctx", "experts", "expert_ids"} and torch.equal(downloads[c]["ctx"], server["ctx"])
        assert downloads[c]["expert_ids"].tolist() == ids and downloads[c]["experts"].shape == (len(ids), 2, 64)
        assert torch.equal(downloads[c]["experts"], pool[ids])
    assert tensor_bytes(downloads[0]) == 3 * tensor_bytes(downloads[3]) + 8 * 2

    new = method.aggregate(server, a, 1)
    weighted = sum(a[c].upload["ctx"].double() * 4 for c in (0, 3, 4)) / 12
    torch.testing.assert_close(new["ctx"], weighted.float())
    assert new["pool_mask"].tolist() == [True, True, True, True, True]
    assert torch.equal(new["pool"][3], a[3].upload["ctx"]) and torch.equal(new["pool"][1], pool[1])
    assert torch.equal(server["pool"], pool) and not server["pool_mask"][3]  # the snapshot is untouched


# ---- evaluation rules (PROTOCOL.md section 3 step 5) ---------------------------------------
def test_evaluation_rules(tiny):
    clip, encoder = tiny
    method = make_method(tiny, num_experts=2)
    g = torch.Generator().manual_seed(9)
    start_pool = pool_at_distances(torch.zeros(2, 64), [0, 0.4, 0.1, 0.3, 0.0], g)  # distances from start_pool[0]
    start_mask = torch.tensor([False, True, True, True, False])
    # participants 1 and 3 upload new prompts, 4 participates for the first time
    # (random offsets: a constant shift of every entry would vanish in the text tower's layer norms)
    step = lambda size: size * unit(torch.randn(128, generator=g)).view(2, 64)  # noqa: E731
    end_pool = start_pool.clone()
    end_pool[1] = start_pool[2] + step(0.01)  # now the closest to client 2
    end_pool[3] = start_pool[3] + step(0.5)
    end_pool[4] = start_pool[2] + step(0.2)
    end_mask = torch.tensor([False, True, True, True, True])
    global_ctx = 0.02 * torch.randn(2, 64, generator=g)
    start_global = 0.02 * torch.randn(2, 64, generator=g)  # the round-start global differs from the round-end one
    gates = {c: {f"gating.{k}": v + 0.01 * c for k, v in method.new_gating(c).state_dict().items()} for c in range(5)}
    states = {
        1: {"ctx": end_pool[1], "expert_ids": torch.tensor([3, 2]), **gates[1]},  # stale order: the server's choice counts
        2: {"ctx": end_pool[2], "expert_ids": torch.tensor([3]), **gates[2]},  # sat out: stale ids are ignored
        3: {"ctx": end_pool[3], "expert_ids": torch.tensor([2, 1]), **gates[3]},
        4: {"ctx": end_pool[4], "expert_ids": torch.tensor([], dtype=torch.int64), **gates[4]},
    }
    view = RoundView(
        5, frozenset({1, 3, 4}), {"ctx": start_global, "pool": start_pool, "pool_mask": start_mask},
        {"ctx": global_ctx, "pool": end_pool, "pool_mask": end_mask}, states,
    )
    evaluator = method.evaluator(view)
    features = clip.encode_images(torch.randn(5, 3, 32, 32, generator=g))

    def expected(local, experts, client):
        with torch.no_grad():
            stack = encoder(torch.stack([local, *experts]))
            gating = method.client_gating(states.get(client), client) if experts else None
            return mixture_logits(features, stack, gating, 0.5, clip.logit_scale)[0]

    near = select_experts(end_pool, end_mask, 2, 2, "nearest")
    assert near == [1, 4]  # chosen from the END-of-round pool P_t
    trained_with = select_experts(start_pool, start_mask, 1, 2, "nearest")
    assert trained_with == [2, 3]  # participant 1's seeded choice from the round-START pool P_{t-1}
    # what the server sends each client to be scored with: the round-end global prompt and the experts above
    downloads = {c: method.evaluation_download(view, c) for c in range(5)}
    for client, ids, pool in ((0, [], end_pool), (1, trained_with, start_pool), (2, near, end_pool), (3, [2, 1], start_pool), (4, [], start_pool)):
        download = downloads[client]
        assert set(download) == {"ctx", "experts", "expert_ids"} and torch.equal(download["ctx"], global_ctx), client
        assert download["expert_ids"].tolist() == ids and download["experts"].shape == (len(ids), 2, 64), client
        assert torch.equal(download["experts"], pool[ids]), client
    assert method.experts_for(view.start_state, 3, 5) == [2, 1]
    # the server computes them without the clients' states
    no_states = RoundView(5, view.participants, view.start_state, view.end_state, {})
    for client in range(5):
        other = method.evaluation_download(no_states, client)
        assert set(other) == set(downloads[client]) and all(torch.equal(other[k], downloads[client][k]) for k in other)
    cases = {
        0: expected(global_ctx, [], 0),  # never trained: global prompt, no experts
        1: expected(end_pool[1], [start_pool[3], start_pool[2]], 1),  # participant: its experts, round-start pool
        2: expected(end_pool[2], [end_pool[1], end_pool[4]], 2),  # sat out: own prompt and gating, experts from P_t
        4: expected(end_pool[4], [], 4),  # first participation: trained without experts
    }
    for client, logits in cases.items():
        torch.testing.assert_close(evaluator.logits(client, features), logits, rtol=1e-5, atol=1e-5)
    # the rules are distinguishable: other pools or prompts give clearly different logits
    assert (expected(end_pool[1], [end_pool[3], end_pool[2]], 1) - cases[1]).abs().max() > 1e-3
    assert (expected(end_pool[2], [start_pool[1], start_pool[3]], 2) - cases[2]).abs().max() > 1e-3
    assert (expected(end_pool[4], [], 4) - expected(global_ctx, [], 4)).abs().max() > 1e-3
    assert (expected(start_global, [], 0) - cases[0]).abs().max() > 1e-3  # never trained: the round-END global
    assert evaluator.extra_metrics(0, features) == {} and evaluator.extra_metrics(4, features) == {}
    attention = evaluator.extra_metrics(1, features)
    assert list(attention) == ["attention_c0001", "attention_c0002", "attention_c0003"]  # local first, then trained_with
    assert sum(attention.values()) == pytest.approx(1.0, abs=1e-6)
    assert list(evaluator.extra_metrics(2, features)) == ["attention_c0002", "attention_c0001", "attention_c0004"]


def test_options_are_validated(tiny):
    assert PFedMoAPOptions(lam=0).lam == 0.0 and isinstance(PFedMoAPOptions(lam=0).lam, float)
    assert PFedMoAPOptions(share_expert_features="false").share_expert_features is False
    for bad, word in [
        ({"num_experts": -1}, "num_experts"),
        ({"num_experts": 2.5}, "num_experts"),
        ({"expert_selection": "best"}, "expert_selection"),
        ({"lam": -0.1}, "lam"),
        ({"gating_heads": 3}, "gating_heads"),
        ({"gating_lr": 0}, "gating_lr"),
        ({"share_expert_features": "maybe"}, "share_expert_features"),
    ]:
        with pytest.raises(ConfigError, match=word) as info:
            PFedMoAPOptions(**bad)
        assert "--method-option" in str(info.value)
    with pytest.raises(ConfigError, match="must divide the CLIP embedding width D=32"):
        make_method(tiny, gating_dim=64, gating_heads=8)


# ---- the CLI end to end ----------------------------------------------------------------------
TRAIN = ("train", "--method", "pfedmoap", "--rounds", "3", "--local-epochs", "1", "--n-ctx", "2", "--batch-size", "16",
         "--frac", "0.5", "--method-option", "num_experts=3", "--method-option", "gating_dim=16", "--method-option", "gating_heads=4")


def partition8(cli, workspace=None):
    result = cli("partition", "--dataset", "synthetic", "--clients", "8", "--seed", "1", "--pathological", "--shots", "2",
                 "--option", "train_per_class=3", "--option", "test_per_class=2", workspace=workspace)
    assert result.exit_code == 0, result.stderr


def run_id_of(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("run ")).split()[1].rstrip(":")


def test_cli_train_partial_participation(cli, tmp_path):
    partition8(cli)
    result = cli(*TRAIN, "--keep-rounds", "all")  # every round is re-scored below
    assert result.exit_code == 0, result.stderr
    assert "3/3 rounds complete" in result.stdout
    run_id = run_id_of(result.stdout)
    run_dir = tmp_path / "ws" / "runs" / run_id
    record = json.loads((run_dir / "run.json").read_text())
    assert record["settings"]["method_options"] == {"num_experts": 3, "gating_dim": 16, "gating_heads": 4}
    metrics = pd.read_csv(run_dir / "metrics.csv")
    acc = metrics[(metrics.metric == "accuracy") & (metrics.split == "test")]
    assert sorted(zip(acc["round"], acc["client_id"])) == [(r, c) for r in range(3) for c in range(8)]
    attention = metrics[metrics.metric.str.startswith("attention_c")]
    assert not attention.empty and (attention["round"] >= 1).all()  # nobody has experts in round 0
    sums = attention.groupby(["round", "client_id"])["value"].sum()
    assert sums.to_numpy() == pytest.approx(1.0, abs=1e-6)
    for (rnd, client), group in attention.groupby(["round", "client_id"]):
        assert f"attention_c{client:04d}" in set(group.metric) and len(group) <= 4
    train = metrics[metrics.split == "train"]
    assert train.groupby("round")["client_id"].nunique().tolist() == [4, 4, 4]
    # down: the global prompt and k <= 3 expert prompts (2 x 64 float32 each) with their int64 client ids; up: one prompt
    down = train[train.metric == "bytes_down"]["value"]
    assert set(down) <= {2 * 64 * 4 * (1 + k) + 8 * k for k in range(4)} and down.max() == 2 * 64 * 4 * 4 + 8 * 3
    assert set(train[train.metric == "bytes_up"]["value"]) == {2 * 64 * 4}
    ckpt = run_dir / "checkpoints" / "round-0002"
    assert (ckpt / "global.safetensors").is_file() and len(list(ckpt.glob("client-*.safetensors"))) >= 4

    # re-scoring the checkpoints reproduces every test metric (evaluation needs nothing outside them)
    assert cli("evaluate", "--run", run_id).exit_code == 0
    rescored = pd.read_csv(run_dir / "evaluation.csv")
    key = ["round", "client_id", "metric"]
    a = metrics[metrics.split == "test"].sort_values(key)[key + ["value"]].reset_index(drop=True)
    b = rescored.sort_values(key)[key + ["value"]].reset_index(drop=True)
    assert a[key].equals(b[key]) and a["value"].to_numpy() == pytest.approx(b["value"].to_numpy(), abs=1e-9)


def test_cli_resume_reproduces_metrics(cli, tmp_path):
    for ws in ("a", "b"):
        partition8(cli, workspace=tmp_path / ws)
    args = (*TRAIN, "--method-option", "expert_selection=random", "--method-option", "lam=0")
    full = cli(*args, workspace=tmp_path / "a")
    assert full.exit_code == 0, full.stderr
    part = cli(*args, "--stop-after", "2", workspace=tmp_path / "b")
    assert "2/3 rounds complete" in part.stdout
    resumed = cli(*args, "--resume", workspace=tmp_path / "b")
    assert resumed.exit_code == 0, resumed.stderr
    run_id = run_id_of(full.stdout)
    assert run_id == run_id_of(resumed.stdout)
    a = (tmp_path / "a" / "runs" / run_id / "metrics.csv").read_text()
    b = (tmp_path / "b" / "runs" / run_id / "metrics.csv").read_text()
    assert a == b and "attention_c" in a


def test_cli_bad_gating_width_is_one_line(cli):
    partition8(cli)
    message = one_line_error(cli("train", "--method", "pfedmoap", "--rounds", "1", "--n-ctx", "2",
                                 "--backbone", "tiny-vit", "--pretrained", "none", "--gating-dim", "128"))
    assert "gating_dim" in message and "--method-option" in message


# ---- the exact savings: softmax layout, evaluation reusing the round's work -------------------
def test_gating_attention_is_a_plain_softmax_over_experts():
    """At a realistic size (102 classes, K+1 = 10 experts) in float32: the attention and T_MoE
    equal a vectorised float64 computation written here, whatever memory layout the module uses."""
    g = torch.Generator().manual_seed(21)
    batch, classes, experts, dim, d_g, heads, sigma = 6, 102, 10, 64, 16, 4, 10.0
    image = unit(torch.randn(batch, dim, generator=g))
    expert_features = unit(torch.randn(experts, classes, dim, generator=g))
    gating = GatingNetwork(dim, d_g, heads, scaling=sigma, generator=torch.Generator().manual_seed(2))
    p = {name: t.detach().double() for name, t in gating.named_parameters()}
    pooled_image, pooled_experts = image.double()[:, ::4], expert_features.double()[..., ::4]
    q = (pooled_image @ p["W_q.weight"].T + p["W_q.bias"]).view(batch, heads, d_g // heads)
    k = (pooled_experts @ p["W_k.weight"].T + p["W_k.bias"]).view(experts, classes, heads, d_g // heads)
    v = (pooled_experts @ p["W_v.weight"].T + p["W_v.bias"]).view(experts, classes, heads, d_g // heads)
    scores = sigma * (q[:, :, None, None, :] * k.permute(2, 1, 0, 3)[None]).sum(-1)  # (B, h, C, E)
    weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    mixed = (weights[..., None] * v.permute(2, 1, 0, 3)[None]).sum(dim=3)  # (B, h, C, d_h)
    moe_expected = mixed.permute(0, 2, 1, 3).reshape(batch, classes, d_g) @ p["W_o.weight"].T + p["W_o.bias"]
    with torch.no_grad():
        moe, attention = gating(image, expert_features)
    assert attention.shape == (batch, heads, classes, experts)
    torch.testing.assert_close(attention.double(), weights, rtol=0, atol=2e-6)
    torch.testing.assert_close(moe.double(), moe_expected, rtol=0, atol=2e-5)


def _trained_round(method, tiny, seed):
    """One round for clients 0, 3, 4 of a five-client federation; returns the view evaluation sees."""
    clip, _ = tiny
    g = torch.Generator().manual_seed(seed)
    pool = 0.02 * torch.randn(5, 2, 64, generator=g)
    server = {"ctx": 0.02 * torch.randn(2, 64, generator=g), "pool": pool, "pool_mask": torch.tensor([True, True, True, False, True])}
    images = torch.randn(4, 3, clip.image_size, clip.image_size, generator=g)
    labels = torch.tensor([0, 1, 2, 3])
    participants = (0, 3, 4)
    method.prepare_round(1, server, participants)
    results = {
        c: method.train_client(ClientJob(c, 1, method.client_download(server, c, 1), None, lambda: [(images, labels)], 4, torch.Generator()))
        for c in participants
    }
    end = method.aggregate(server, results, 1)
    states = {c: r.client_state for c, r in results.items()}
    # client 2 sat out with a state of its own: scored with experts from the end-of-round pool
    states[2] = {"ctx": pool[2].clone(), "expert_ids": torch.tensor([0]), **{f"gating.{k}": v for k, v in method.new_gating(2).state_dict().items()}}
    return RoundView(1, frozenset(participants), server, end, states)


def test_evaluation_encodes_no_prompt_the_round_already_encoded(tiny, monkeypatch):
    clip, encoder = tiny
    method = make_method(tiny, num_experts=2)
    view = _trained_round(method, tiny, seed=3)
    cached = {p.numpy().tobytes() for p in method._cache.prompts}
    assert len(cached) == 3  # the participants' experts: pool entries 1, 2 and 4 (client 3 has none yet)
    encoded: list[bytes] = []
    plain_forward = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda ctx: encoded.extend(p.detach().numpy().tobytes() for p in ctx) or plain_forward(ctx))
    evaluator = method.evaluator(view)
    assert encoded, "the new local prompts must still be encoded"
    assert not cached & set(encoded), "evaluation re-encoded an expert prompt of the round's cache"
    assert len(encoded) == len(set(encoded)), "a prompt was encoded twice"
    needed = set()  # every prompt evaluation needs: each client's own (or the global) prompt and its experts
    for c in range(5):
        download, state = method.evaluation_download(view, c), view.client_states.get(c)
        needed.add((state["ctx"] if state else download["ctx"]).numpy().tobytes())
        if state:
            needed.update(p.numpy().tobytes() for p in download["experts"])
    assert set(encoded) == needed - cached
    # the same numbers as an evaluator that encodes everything itself
    monkeypatch.undo()
    fresh = make_method(tiny, num_experts=2).evaluator(view)
    features = clip.encode_images(torch.randn(5, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(4)))
    for c in range(5):
        torch.testing.assert_close(evaluator.logits(c, features), fresh.logits(c, features), rtol=1e-5, atol=1e-5)
        got, want = evaluator.extra_metrics(c, features), fresh.extra_metrics(c, features)
        assert list(got) == list(want) and list(got.values()) == pytest.approx(list(want.values()), abs=1e-6)


def test_evaluation_runs_the_gating_once_per_batch(tiny, monkeypatch):
    from pfedmoap_cli.engine.evaluation import score_client

    clip, encoder = tiny
    method = make_method(tiny, num_experts=2)
    view = _trained_round(method, tiny, seed=5)
    evaluator = method.evaluator(view)
    g = torch.Generator().manual_seed(6)
    features = clip.encode_images(torch.randn(7, 3, clip.image_size, clip.image_size, generator=g))
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    calls = []
    plain_forward = GatingNetwork.forward
    monkeypatch.setattr(GatingNetwork, "forward", lambda self, *args: calls.append(len(args[0])) or plain_forward(self, *args))
    for client in (0, 2):  # a participant with experts, and a client that sat out
        calls.clear()
        score = score_client(evaluator, client, features, labels, batch_size=3)
        assert calls == [3, 3, 1], "one gating forward per scored batch, none more for the attention metrics"
        assert not evaluator._tallies  # the kept attention (and the images it holds) is released once used
        # the attention metrics, computed separately here: mean over images, heads and classes of each expert's weight
        plan = evaluator.plans[client]
        with torch.no_grad():
            _, attention = plain_forward(plan.gating, features, plan.expert_features)
        expected = attention.double().mean(dim=(0, 1, 2)).tolist()
        assert list(score.extra) == [f"attention_c{j:04d}" for j in plan.expert_ids]
        assert list(score.extra.values()) == pytest.approx(expected, abs=1e-7)
    # attention metrics asked for other images than logits saw (fewer, as many, more) are computed for those images
    fresh = clip.encode_images(torch.randn(7, 3, clip.image_size, clip.image_size, generator=g))
    for client in (0, 2):
        for seen, other in ((features, features[:4]), (features, fresh), (features[:3], features)):
            evaluator.logits(client, seen)
            plan = evaluator.plans[client]
            with torch.no_grad():
                expected = plain_forward(plan.gating, other, plan.expert_features)[1].double().mean(dim=(0, 1, 2)).tolist()
            assert list(evaluator.extra_metrics(client, other).values()) == pytest.approx(expected, abs=1e-7)
