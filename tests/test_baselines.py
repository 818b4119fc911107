"""The Table 1 baselines: each method's defining property against an independent computation.

PromptFL+FT, Prompt+FedProx, Prompt+FedPer, Prompt+FedAMP, pFedPrompt and
FedOTP (with its local image tokens and unbalanced OT solver). Tiny random
towers only; the end-to-end runs of every method live in test_method_registry.py.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pfedmoap_cli.compat import import_open_clip
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.base import ClientJob, LocalTraining, MethodEnv, RoundView
from pfedmoap_cli.methods.coop import train_prompt
from pfedmoap_cli.methods.fedamp import FedAMP, FedAMPOptions, attention_weights
from pfedmoap_cli.methods.fedotp import FedOTP, FedOTPOptions, ot_logits
from pfedmoap_cli.methods.fedper import FedPer
from pfedmoap_cli.methods.fedprox import FedProx, FedProxOptions, proximal_term
from pfedmoap_cli.methods.local_training import prompt_logits
from pfedmoap_cli.methods.ot import unbalanced_sinkhorn
from pfedmoap_cli.methods.pfedprompt import PFedPrompt
from pfedmoap_cli.methods.promptfl import PromptFL
from pfedmoap_cli.methods.promptfl_ft import PromptFLFineTune, PromptFLFineTuneOptions
from pfedmoap_cli.model.backbone import BackboneSpec, FrozenClip, load_backbone, register_tiny_configs
from pfedmoap_cli.model.local_tokens import attention_pool_tokens, encode_image_tokens, num_local_tokens
from pfedmoap_cli.model.prompt import PromptTextEncoder

CLASSES = ["red circle", "blue square", "green star", "yellow ring", "purple cross"]
N_CTX = 4


# ---- fixtures ---------------------------------------------------------------------------
def _tiny_clip(vision_cfg: dict, name: str) -> FrozenClip:
    """A tiny open_clip CLIP with a custom image tower (seeded), wrapped like load_backbone does."""
    open_clip = import_open_clip()
    register_tiny_configs()
    text_cfg = dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg)
    return FrozenClip(model, BackboneSpec(name, None), open_clip.get_tokenizer("tiny-vit"))


@pytest.fixture(scope="module")
def towers() -> dict[str, FrozenClip]:
    """tiny-vit (16 local tokens) and a tiny ResNet at 64 px (2 x 2 = 4 positions; tiny-rn has 1)."""
    return {
        "vit": load_backbone(BackboneSpec("tiny-vit", None)),
        "rn": _tiny_clip(dict(image_size=64, layers=[1, 1, 1, 1], width=8, patch_size=None), "tiny-rn-64"),
    }


def make_env(clip: FrozenClip, training: LocalTraining | None = None, num_clients: int = 4) -> MethodEnv:
    return MethodEnv(
        clip=clip,
        text_encoder=PromptTextEncoder(clip, CLASSES, n_ctx=N_CTX),
        class_names=tuple(CLASSES),
        num_clients=num_clients,
        training=training or LocalTraining(local_epochs=2, lr=0.05, momentum=0.9, weight_decay=5e-4),
        seed=0,
        device=torch.device("cpu"),
    )


def data(clip: FrozenClip, seed: int, n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed batches (images, labels) of 3 images each."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, clip.image_size, clip.image_size, generator=g)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    return [(images[i : i + 3], labels[i : i + 3]) for i in range(0, n, 3)]


def job(client_id: int, server_state, client_state, batches, round_index: int = 0) -> ClientJob:
    return ClientJob(
        client_id=client_id,
        round_index=round_index,
        server_state=server_state,
        client_state=client_state,
        batches=lambda: iter(batches),
        num_examples=sum(len(labels) for _, labels in batches),
        generator=torch.Generator().manual_seed(100 + client_id),
        plain_batches=lambda: iter(batches),  # fixed tensors: the "un-augmented" view is the same batches
    )


def download_job(method, client_id: int, server_state, client_state, batches, round_index: int = 0) -> ClientJob:
    """A client's job as the engine builds it: from the method's download of ``server_state``, not the whole state."""
    return job(client_id, method.client_download(server_state, client_id, round_index), client_state, batches, round_index)


def view(round_index, participants, start, end, client_states) -> RoundView:
    return RoundView(round_index, frozenset(participants), start, end, client_states)


def fedavg(tensors, weights):
    return sum(t.double() * w for t, w in zip(tensors, weights)) / sum(weights)


# ---- CoOp ----------------------------------------------------------------------------------
def test_coop_sends_nothing_and_a_client_starts_from_the_run_initial_prompt(towers):
    from pfedmoap_cli.methods.coop import CoOp

    env = make_env(towers["vit"])
    method = CoOp(env)
    start = method.initial_state()
    assert set(start) == {"init_ctx"} and method.client_download(start, 1, 0) == {}
    batches = data(env.clip, 15)
    first = method.train_client(download_job(method, 1, start, None, batches))
    assert first.upload == {} and set(first.client_state) == {"ctx"}
    expected, _ = train_prompt(method, job(1, {}, None, batches), start["init_ctx"])
    assert torch.equal(first.client_state["ctx"], expected)
    # later rounds continue from the client's own prompt
    again = method.train_client(download_job(method, 1, start, first.client_state, batches, round_index=1))
    expected, _ = train_prompt(method, job(1, {}, None, batches, round_index=1), first.client_state["ctx"])
    assert torch.equal(again.client_state["ctx"], expected) and not torch.equal(expected, first.client_state["ctx"])


# ---- PromptFL+FT --------------------------------------------------------------------------
def test_promptfl_ft_federation_is_promptfl_and_scoring_uses_the_fine_tuned_prompt(towers):
    """Uploads and FedAvg are PromptFL's; a client is scored with its ``ft_ctx`` (the fine-tuning itself,
    of the NEW global prompt for every client, is checked in test_protocol_rules.py)."""
    env = make_env(towers["vit"])
    method, plain = PromptFLFineTune(env), PromptFL(env)
    start = method.initial_server_state(torch.Generator().manual_seed(0))
    batches = {0: data(env.clip, 0), 1: data(env.clip, 1, n=3)}
    results = {c: method.train_client(download_job(method, c, start, None, batches[c])) for c in batches}
    end = method.aggregate(start, results, 0)
    for c in batches:
        assert set(method.client_download(start, c, 0)) == {"ctx"}
        assert torch.equal(results[c].upload["ctx"], plain.train_client(download_job(plain, c, start, None, batches[c])).upload["ctx"])
    assert torch.allclose(end["ctx"].double(), fedavg([results[c].upload["ctx"] for c in (0, 1)], [6, 3]), atol=1e-7)
    states = {c: method.personalize_client(job(c, end, None, batches[c])) for c in batches}
    evaluator = method.evaluator(view(0, {0, 1}, start, end, states))
    features = env.clip.encode_images(batches[0][0][0])
    with torch.no_grad():
        expect_ft = prompt_logits(features, env.text_encoder(states[0]["ft_ctx"]), env.logit_scale)
        expect_global = prompt_logits(features, env.text_encoder(end["ctx"]), env.logit_scale)
    assert torch.allclose(evaluator.logits(0, features), expect_ft, atol=1e-5)
    assert not torch.allclose(evaluator.logits(0, features), expect_global, atol=1e-4)
    assert torch.allclose(evaluator.logits(3, features), expect_global, atol=1e-5)  # no fine-tuned prompt: the global one


# ---- FedProx ------------------------------------------------------------------------------
def test_fedprox_gradient_is_plain_gradient_plus_mu_times_distance(towers):
    env = make_env(towers["vit"])
    mu = 0.5
    g = torch.Generator().manual_seed(1)
    anchor = env.text_encoder.initial_context(g)
    ctx = (anchor + 0.3 * torch.randn(anchor.shape, generator=g)).requires_grad_(True)
    images, labels = data(env.clip, 2)[0]
    features = env.clip.encode_images(images)

    def ce():
        return F.cross_entropy(env.logit_scale * features @ env.text_encoder(ctx).t(), labels)

    (plain,) = torch.autograd.grad(ce(), ctx)
    (prox,) = torch.autograd.grad(ce() + proximal_term(anchor, mu)(ctx), ctx)
    assert torch.allclose(prox - plain, mu * (ctx.detach() - anchor), atol=1e-6)
    assert (ctx.detach() - anchor).abs().max() > 0.1  # the term is far from negligible here


def test_fedprox_term_reaches_the_optimiser(towers):
    """Two plain SGD steps: the first is PromptFL's (ctx = global), the second differs by -lr*mu*(ctx1 - global)."""
    lr, mu = 0.5, 4.0
    env = make_env(towers["vit"], LocalTraining(local_epochs=1, lr=lr, momentum=0.0, weight_decay=0.0))
    start = PromptFL(env).initial_server_state(torch.Generator().manual_seed(0))
    batches = data(env.clip, 3)
    fedprox = FedProx(env, FedProxOptions(mu=mu))
    assert set(fedprox.client_download(start, 0, 0)) == {"ctx"}  # the global prompt is the proximal anchor
    one_step = PromptFL(env).train_client(download_job(PromptFL(env), 0, start, None, batches[:1])).upload["ctx"]
    plain = PromptFL(env).train_client(download_job(PromptFL(env), 0, start, None, batches)).upload["ctx"]
    prox = fedprox.train_client(download_job(fedprox, 0, start, None, batches)).upload["ctx"]
    expected = -lr * mu * (one_step - start["ctx"])
    assert expected.abs().max() > 1e-4
    assert torch.allclose(prox - plain, expected, atol=1e-6)


def test_fedprox_option_is_checked():
    with pytest.raises(ConfigError, match="mu"):
        FedProxOptions(mu=-1)
    assert FedProxOptions().mu == 0.5 and FedProxOptions(mu=1).mu == 1.0


# ---- FedPer -------------------------------------------------------------------------------
def test_fedper_uploads_and_averages_only_the_shared_half(towers):
    env = make_env(towers["vit"])
    method = FedPer(env)
    assert method.shared == N_CTX // 2
    start = method.initial_state()  # a client starts its personal half from it without the server sending it
    assert start["ctx_shared"].shape == (2, 64) and start["personal_init"].shape == (2, 64)
    batches = {0: data(env.clip, 4), 2: data(env.clip, 5, n=3)}
    for c in batches:
        download = method.client_download(start, c, 0)
        assert set(download) == {"ctx_shared"} and torch.equal(download["ctx_shared"], start["ctx_shared"])
    results = {c: method.train_client(download_job(method, c, start, None, batches[c])) for c in batches}
    for c, result in results.items():
        assert set(result.upload) == {"ctx_shared"} and result.upload["ctx_shared"].shape == (2, 64)
        assert result.upload["ctx_shared"].dtype == torch.float32  # 2 x 64 float32 up: the shared half only
        assert set(result.client_state) == {"personal"} and result.client_state["personal"].shape == (2, 64)
        assert not torch.equal(result.client_state["personal"], start["personal_init"])
    # the shared and personal halves are one trained context: the same as training [shared ; personal] with PromptFL
    whole = PromptFL(env).train_client(job(0, {"ctx": torch.cat([start["ctx_shared"], start["personal_init"]])}, None, batches[0]))
    assert torch.equal(torch.cat([results[0].upload["ctx_shared"], results[0].client_state["personal"]]), whole.upload["ctx"])
    end = method.aggregate(start, results, 0)
    assert set(end) == {"ctx_shared", "personal_init"}
    assert torch.allclose(end["ctx_shared"].double(), fedavg([results[c].upload["ctx_shared"] for c in (0, 2)], [6, 3]), atol=1e-7)
    assert torch.equal(end["personal_init"], start["personal_init"])
    # evaluation: [new shared ; own personal], or the initial personal half for a client that never trained
    states = {c: results[c].client_state for c in results}
    evaluator = method.evaluator(view(0, {0, 2}, start, end, states))
    features = env.clip.encode_images(batches[0][0][0])
    with torch.no_grad():
        for c, personal in ((0, states[0]["personal"]), (1, start["personal_init"])):
            expected = prompt_logits(features, env.text_encoder(torch.cat([end["ctx_shared"], personal])), env.logit_scale)
            assert torch.allclose(evaluator.logits(c, features), expected, atol=1e-5)


def test_fedper_needs_two_context_tokens(towers):
    env = make_env(towers["vit"])
    env.text_encoder = PromptTextEncoder(env.clip, CLASSES, n_ctx=1)
    with pytest.raises(ConfigError, match="shared_tokens"):
        FedPer(env)


# ---- FedAMP -------------------------------------------------------------------------------
def test_fedamp_weights_sum_to_one_and_favour_the_similar_client():
    g = torch.Generator().manual_seed(0)
    own = torch.randn(4, 8, generator=g)
    similar = own + 0.1 * torch.randn(4, 8, generator=g)
    unrelated = torch.randn(4, 8, generator=g)
    opposite = -own + 0.1 * torch.randn(4, 8, generator=g)
    others = torch.stack([unrelated, similar, opposite])
    for sigma, self_weight in ((10.0, 0.5), (1.0, 0.2), (0.0, 0.0)):
        w = attention_weights(own, others, sigma, self_weight)
        assert w.shape == (4,) and float(w.sum()) == pytest.approx(1.0, abs=1e-12)
        assert float(w[0]) == pytest.approx(self_weight)
        cos = torch.tensor([F.cosine_similarity(own.flatten(), o.flatten(), dim=0).item() for o in others], dtype=torch.float64)
        independent = (1 - self_weight) * torch.exp(sigma * cos) / torch.exp(sigma * cos).sum()
        assert torch.allclose(w[1:], independent, atol=1e-12)
        if sigma > 0:
            assert w[2] > w[1] > w[3]  # similar > unrelated > opposite
    assert torch.equal(attention_weights(own, others[:0], 10.0, 0.5), torch.ones(1, dtype=torch.float64))


def test_fedamp_message_uses_the_round_start_pool_without_the_client_itself(towers):
    env = make_env(towers["vit"], num_clients=4)
    method = FedAMP(env, FedAMPOptions(sigma=5.0, self_weight=0.3, lam=2.0))
    g = torch.Generator().manual_seed(1)
    state = method.initial_server_state(g)
    state["pool"] = torch.randn(state["pool"].shape, generator=g)
    state["in_pool"] = torch.tensor([True, True, False, True])
    own = state["pool"][0]  # the client's own prompt is its last upload, which the pool keeps exactly
    u = method.message(state, 0)
    w = attention_weights(own, state["pool"][[1, 3]], 5.0, 0.3)
    expected = w[0] * own.double() + w[1] * state["pool"][1].double() + w[2] * state["pool"][3].double()
    assert torch.allclose(u.double(), expected, atol=1e-6)
    # the client receives u_0 and nothing else: the pool stays on the server
    download = method.client_download(state, 0, 3)
    assert set(download) == {"u"} and torch.equal(download["u"], u) and download["u"].shape == (N_CTX, 64)
    # before its first upload a client's own prompt is the initial one
    w = attention_weights(state["ctx_init"], state["pool"][[0, 1, 3]], 5.0, 0.3)
    expected = w[0] * state["ctx_init"].double() + sum(w[1 + k] * state["pool"][j].double() for k, j in enumerate((0, 1, 3)))
    assert torch.allclose(method.message(state, 2).double(), expected, atol=1e-6)
    assert torch.equal(method.message({**state, "in_pool": torch.zeros(4, dtype=torch.bool)}, 0), state["ctx_init"])


def test_fedamp_round_keeps_personal_prompts_and_a_pool(towers):
    env = make_env(towers["vit"], num_clients=3)
    method = FedAMP(env)
    start = method.initial_state()  # a first-time client starts from its ctx_init without the server sending it
    batches = {0: data(env.clip, 6), 1: data(env.clip, 7)}
    results = {c: method.train_client(download_job(method, c, start, None, batches[c])) for c in batches}
    # round 0: nobody is in the pool, so u = ctx_init; training starts from ctx_init too
    for c in batches:
        assert torch.equal(method.client_download(start, c, 0)["u"], start["ctx_init"])
        pull = proximal_term(start["ctx_init"], method.options.lam)
        first, _ = train_prompt(method, job(c, {}, None, batches[c]), start["ctx_init"], extra_loss=pull)
        assert torch.equal(results[c].upload["ctx"], first)
    end = method.aggregate(start, results, 0)
    assert end["in_pool"].tolist() == [True, True, False]
    for c in batches:
        assert torch.equal(end["pool"][c], results[c].upload["ctx"])
        assert torch.equal(results[c].client_state["ctx"], results[c].upload["ctx"])
    # round 1: client 0 is pulled towards u_0 = 0.5 ctx_0 + 0.5 ctx_1 and starts from its own prompt
    again = method.train_client(download_job(method, 0, end, results[0].client_state, batches[0], round_index=1))
    u = method.message(end, 0)
    assert torch.equal(method.client_download(end, 0, 1)["u"], u)
    assert torch.allclose(u, 0.5 * results[0].upload["ctx"] + 0.5 * results[1].upload["ctx"], atol=1e-6)
    reference = FedProx(env, FedProxOptions(mu=1.0))  # same loss: CE + (1/2)||ctx - u_0||^2, from the own prompt
    ctx, _ = train_prompt(reference, job(0, end, None, batches[0], round_index=1), results[0].client_state["ctx"], extra_loss=proximal_term(u, 1.0))
    assert torch.equal(again.upload["ctx"], ctx)
    evaluator = method.evaluator(view(1, {0}, end, method.aggregate(end, {0: again}, 1), {0: again.client_state}))
    features = env.clip.encode_images(batches[0][0][0])
    with torch.no_grad():
        assert torch.allclose(evaluator.logits(0, features), prompt_logits(features, env.text_encoder(ctx), env.logit_scale), atol=1e-5)
        assert torch.allclose(evaluator.logits(2, features), prompt_logits(features, env.text_encoder(start["ctx_init"]), env.logit_scale), atol=1e-5)


# ---- pFedPrompt ---------------------------------------------------------------------------
def test_pfedprompt_memory_and_attention_never_leave_the_client(towers):
    env = make_env(towers["vit"])
    method = PFedPrompt(env)
    start = method.initial_server_state(torch.Generator().manual_seed(0))
    batches = data(env.clip, 8)
    assert set(method.client_download(start, 0, 0)) == {"ctx"}  # down: the global prompt only
    first = method.train_client(download_job(method, 0, start, None, batches))
    assert set(first.upload) == {"ctx"} and first.upload["ctx"].shape == (N_CTX, 64) and first.upload["ctx"].dtype == torch.float32
    state = first.client_state
    assert set(state) == {"memory_features", "memory_labels", "attn_q", "attn_k"}
    images = torch.cat([b[0] for b in batches])
    assert torch.allclose(state["memory_features"], env.clip.encode_images(images), atol=1e-6)
    assert torch.equal(state["memory_labels"], torch.cat([b[1] for b in batches]))
    end = method.aggregate(start, {0: first}, 0)
    assert set(end) == {"ctx"} and torch.equal(end["ctx"], first.upload["ctx"])
    # the next round reuses the memory and keeps training the attention
    second = method.train_client(download_job(method, 0, end, state, batches, round_index=1))
    assert set(second.upload) == {"ctx"}
    assert torch.equal(second.client_state["memory_features"], state["memory_features"])
    assert not torch.equal(second.client_state["attn_q"], state["attn_q"])
    # scoring: text logits of the global prompt plus alpha * s * attention class scores
    evaluator = method.evaluator(view(0, {0}, start, end, {0: state}))
    features = env.clip.encode_images(data(env.clip, 9)[0][0])
    with torch.no_grad():
        text_logits = env.logit_scale * features @ env.text_encoder(end["ctx"]).t()
        attention = torch.softmax(10.0 * (features @ state["attn_q"]) @ (state["memory_features"] @ state["attn_k"]).t(), dim=-1)
        scores = torch.zeros(len(features), len(CLASSES))
        for j, label in enumerate(state["memory_labels"].tolist()):
            scores[:, label] += attention[:, j]
        assert torch.allclose(evaluator.logits(0, features), text_logits + env.logit_scale * scores, atol=1e-5)
        assert torch.allclose(evaluator.logits(1, features), text_logits, atol=1e-5)  # never trained: text only


# ---- FedOTP: local tokens -----------------------------------------------------------------
def test_vit_local_tokens(towers):
    clip = towers["vit"]
    images = data(clip, 10)[0][0]
    tokens = encode_image_tokens(clip, images)
    assert tokens.shape == (3, 1 + 16, 32) and num_local_tokens(clip) == 16
    assert torch.allclose(tokens[:, 0], clip.encode_images(images), atol=1e-6)  # class token = encode_image
    visual = clip.clip.visual
    visual.output_tokens = True  # open_clip's own (unprojected) patch tokens, after ln_post
    try:
        with torch.no_grad():
            _, patches = visual(images)
    finally:
        visual.output_tokens = False
    assert torch.allclose(tokens[:, 1:], F.normalize(patches @ visual.proj, dim=-1), atol=1e-6)


def test_resnet_local_tokens_reuse_the_attention_pool(towers):
    clip = towers["rn"]
    visual = clip.clip.visual
    images = data(clip, 11)[0][0]
    with torch.no_grad():
        fmap = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
        tokens = attention_pool_tokens(visual.attnpool, fmap)
        assert fmap.shape[-2:] == (2, 2) and tokens.shape == (3, 5, 32) and num_local_tokens(clip) == 4
        # applied the pooled way (the mean token as the query) it is open_clip's attention pool
        assert torch.allclose(tokens[:, 0], visual.attnpool(fmap), atol=1e-5)
        # every position: torch's multi-head attention with that position as the only query
        pool = visual.attnpool
        seq = fmap.flatten(2).permute(2, 0, 1)
        seq = torch.cat([seq.mean(dim=0, keepdim=True), seq]) + pool.positional_embedding[:, None, :]
        for p in range(seq.shape[0]):
            out, _ = F.multi_head_attention_forward(
                seq[p : p + 1], seq, seq, seq.shape[-1], pool.num_heads,
                None, torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False, 0.0,
                pool.c_proj.weight, pool.c_proj.bias, training=False, need_weights=False, use_separate_proj_weight=True,
                q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            )
            assert torch.allclose(tokens[:, p], out[0], atol=1e-5)
    full = encode_image_tokens(clip, images)
    assert torch.allclose(full[:, 0], clip.encode_images(images), atol=1e-6)
    assert torch.allclose(full, F.normalize(tokens, dim=-1), atol=1e-6)


# ---- FedOTP: transport --------------------------------------------------------------------
def plain_plan(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, iterations: int) -> torch.Tensor:
    """One problem, float64, the textbook scaling iterations u = min(1, a/Kv), v = b/K^T u."""
    k = torch.exp(-cost.double() / eps)
    v = torch.ones(cost.shape[1], dtype=torch.float64)
    for _ in range(iterations):
        u = torch.clamp(a.double() / (k @ v), max=1.0)
        v = b.double() / (k.t() @ u)
    return u[:, None] * k * v[None, :]


@pytest.mark.parametrize("eps", [0.1, 0.01])
def test_unbalanced_ot_meets_its_marginals(eps):
    g = torch.Generator().manual_seed(0)
    m, n, top = 9, 2, 0.8
    cost = 1.0 - (torch.rand(4, 5, m, n, generator=g) * 0.8 - 0.2)
    a, b = torch.full((m,), 1 / m), torch.full((n,), top / n)
    result = unbalanced_sinkhorn(cost, a, b, eps, threshold=1e-6, max_iter=5000)
    plan = result.plan
    assert plan.shape == cost.shape and not plan.requires_grad
    assert result.iterations < 5000 and result.error < 1e-6
    assert torch.allclose(plan.sum(dim=-2), b.expand(4, 5, n), atol=1e-6)  # every prompt gets its mass
    assert (plan.sum(dim=-1) <= a + 1e-6).all()  # no token sends more than its own
    assert torch.allclose(plan.sum(dim=(-2, -1)), torch.full((4, 5), top), atol=1e-5)
    for i, j in ((0, 0), (3, 4)):
        assert torch.allclose(plan[i, j].double(), plain_plan(cost[i, j], a, b, eps, 5000), atol=1e-5)
    # the defaults stop on the threshold or the cap, whichever comes first
    capped = unbalanced_sinkhorn(cost, a, b, eps, threshold=1e-3, max_iter=100)
    assert capped.iterations == 100 or capped.error < 1e-3
    assert capped.iterations <= 100 and torch.allclose(capped.plan.sum(dim=-2), b.expand(4, 5, n), atol=1e-5)


@pytest.mark.parametrize("tower", ["vit", "rn"])
def test_fedotp_logits_match_a_plain_loop(towers, tower):
    clip = towers[tower]
    env = make_env(clip)
    g = torch.Generator().manual_seed(5)
    prompts = torch.stack([env.text_encoder.initial_context(g), env.text_encoder.initial_context(g)])
    text = env.text_encoder(prompts)  # (2, C, D)
    tokens = encode_image_tokens(clip, data(clip, 12)[0][0])[:, 1:]
    options = FedOTPOptions(eps=0.1, threshold=1e-9, max_iter=20000)
    logits = ot_logits(tokens, text, env.logit_scale, options)
    m = tokens.shape[1]
    a, b = torch.full((m,), 1 / m), torch.full((2,), 0.8 / 2)
    expected = torch.zeros(len(tokens), len(CLASSES), dtype=torch.float64)
    for i in range(len(tokens)):
        for c in range(len(CLASSES)):
            sim = (tokens[i].double() @ text[:, c].detach().double().t())  # (M, 2)
            plan = plain_plan(1.0 - sim, a, b, options.eps, 2000)
            expected[i, c] = env.logit_scale * (plan * sim).sum()
    assert torch.allclose(logits.double(), expected, atol=1e-4)
    # the plan is a constant; gradients reach both prompts through the similarities
    leaf = prompts.clone().requires_grad_(True)
    ot_logits(tokens, env.text_encoder(leaf), env.logit_scale, options).sum().backward()
    assert leaf.grad[0].abs().sum() > 0 and leaf.grad[1].abs().sum() > 0


def test_fedotp_round_uploads_the_global_prompt_and_keeps_the_local_one(towers):
    env = make_env(towers["rn"])
    method = FedOTP(env)
    start = method.initial_state()  # a client starts its local prompt from it without the server sending it
    assert not torch.equal(start["ctx"], start["local_init"])
    batches = {0: data(env.clip, 13), 1: data(env.clip, 14, n=3)}
    for c in batches:
        download = method.client_download(start, c, 0)
        assert set(download) == {"ctx"} and torch.equal(download["ctx"], start["ctx"])
    results = {c: method.train_client(download_job(method, c, start, None, batches[c])) for c in batches}
    for result in results.values():
        assert set(result.upload) == {"ctx"} and set(result.client_state) == {"local_ctx"}
        assert not torch.equal(result.upload["ctx"], start["ctx"])
        assert not torch.equal(result.client_state["local_ctx"], start["local_init"])
    end = method.aggregate(start, results, 0)
    assert torch.allclose(end["ctx"].double(), fedavg([results[c].upload["ctx"] for c in (0, 1)], [6, 3]), atol=1e-7)
    assert torch.equal(end["local_init"], start["local_init"])
    states = {c: results[c].client_state for c in results}
    evaluator = method.evaluator(view(0, {0, 1}, start, end, states))
    images = batches[0][0][0]
    tokens = encode_image_tokens(env.clip, images)
    with torch.no_grad():
        for c, local in ((0, states[0]["local_ctx"]), (2, start["local_init"])):
            text = env.text_encoder(torch.stack([end["ctx"], local]))
            assert torch.allclose(evaluator.logits(c, tokens), ot_logits(tokens[:, 1:], text, env.logit_scale, method.options), atol=1e-5)
    with pytest.raises(ConfigError, match="local image tokens"):
        evaluator.logits(0, env.clip.encode_images(images))
    # with a zero learning rate nothing moves: a first-time client starts from the downloaded global prompt and
    # the initial local prompt of the run (method.initial_state(), never sent)
    frozen = FedOTP(make_env(env.clip, LocalTraining(local_epochs=1, lr=0.0)))
    origin = frozen.initial_state()
    still = frozen.train_client(download_job(frozen, 0, {**origin, "ctx": end["ctx"]}, None, batches[0]))
    assert torch.equal(still.upload["ctx"], end["ctx"]) and torch.equal(still.client_state["local_ctx"], origin["local_init"])


def test_fedotp_end_to_end_with_token_test_features(cli, tmp_path):
    """FedOTP through the CLI: the engine caches the test images' tokens (N, 1 + M, D) for it."""
    part = ("partition", "--dataset", "synthetic", "--clients", "3", "--seed", "1", "--pathological", "--shots", "2",
            "--option", "train_per_class=2", "--option", "test_per_class=1")
    args = ("train", "--method", "fedotp", "--rounds", "2", "--local-epochs", "1", "--n-ctx", "2", "--batch-size", "4",
            "--frac", "0.67", "--method-option", "eps=0.1")
    for ws in ("a", "b"):
        assert cli(*part, workspace=tmp_path / ws).exit_code == 0
    full = cli(*args, workspace=tmp_path / "a")
    assert full.exit_code == 0, full.stderr
    assert cli(*args, "--stop-after", "1", workspace=tmp_path / "b").exit_code == 0
    resumed = cli(*args, "--resume", workspace=tmp_path / "b")
    assert resumed.exit_code == 0, resumed.stderr
    a = next((tmp_path / "a" / "runs").glob("*/metrics.csv"))
    b = next((tmp_path / "b" / "runs").glob("*/metrics.csv"))
    assert a.read_text() == b.read_text()
    metrics = pd.read_csv(a)
    acc = metrics[(metrics.metric == "accuracy") & (metrics.split == "test")]
    assert sorted(acc["round"].unique()) == [0, 1] and sorted(acc.client_id.unique()) == [0, 1, 2]
    from safetensors import safe_open

    (cache_file,) = (tmp_path / "a" / "cache" / "features").glob("*.safetensors")
    with safe_open(str(cache_file), "pt") as handle:
        (name,) = handle.keys()
        assert len(handle.get_slice(name).get_shape()) == 3  # tokens, not pooled features


def test_method_options_are_validated():
    with pytest.raises(ConfigError, match="top_percent"):
        FedOTPOptions(top_percent=1.5)
    with pytest.raises(ConfigError, match="max_iter"):
        FedOTPOptions(max_iter=0)
    with pytest.raises(ConfigError, match="self_weight"):
        FedAMPOptions(self_weight=1.0)
    with pytest.raises(ConfigError, match="ft_epochs"):
        PromptFLFineTuneOptions(ft_epochs=0)
    assert FedOTPOptions() == FedOTPOptions(eps=0.01, top_percent=0.8, threshold=1e-3, max_iter=100)
