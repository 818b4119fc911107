"""FedCoCoOp: per-image conditional prompts, chunked evaluation and FedAvg of context and meta-net.

Every expectation is computed here by hand, image by image: the meta-net with
F.linear / relu on the state's tensors, the text encoder on one (n_ctx, W)
context at a time. Tiny random tiny-vit tower only.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pfedmoap_cli.methods.fedcocoop  # noqa: F401  (registers the method)
from conftest import method_env

from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.base import ClientJob, ClientResult, LocalTraining, MethodEnv, RoundView
from pfedmoap_cli.methods.fedcocoop import FedCoCoOp, FedCoCoOpOptions
from pfedmoap_cli.methods.promptfl import PromptFL
from pfedmoap_cli.model.backbone import BackboneSpec, FrozenClip, load_backbone
from pfedmoap_cli.seeding import torch_generator

CLASSES = ["red circle", "blue square", "green star", "yellow ring", "purple cross"]
N_CTX = 4
META = ("meta.0.weight", "meta.0.bias", "meta.2.weight", "meta.2.bias")


@pytest.fixture(scope="module")
def clip() -> FrozenClip:
    return load_backbone(BackboneSpec("tiny-vit", None))


def make_env(clip: FrozenClip, training: LocalTraining | None = None, seed: int = 0) -> MethodEnv:
    return method_env(
        clip, CLASSES, n_ctx=N_CTX, num_clients=4, seed=seed,
        training=training or LocalTraining(local_epochs=1, lr=0.05, momentum=0.9, weight_decay=5e-4),
    )


def random_state(env: MethodEnv, seed: int) -> dict[str, torch.Tensor]:
    """A server state with a clearly non-trivial meta-net (larger than the default init)."""
    g = torch.Generator().manual_seed(seed)
    state = FedCoCoOp(env).initial_state()
    return {key: torch.randn(value.shape, generator=g) * (0.02 if key == "ctx" else 0.5) for key, value in state.items()}


def unit_features(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=-1)


def meta_by_hand(state, f: torch.Tensor) -> torch.Tensor:
    """h(f) for ONE feature (D,) -> (W,)."""
    hidden = F.relu(F.linear(f, state["meta.0.weight"], state["meta.0.bias"]))
    return F.linear(hidden, state["meta.2.weight"], state["meta.2.bias"])


def logits_by_hand(env: MethodEnv, state, features: torch.Tensor) -> torch.Tensor:
    """s * f_b @ t(ctx + h(f_b))^T, one image at a time."""
    rows = []
    for f in features:
        text = env.text_encoder(state["ctx"] + meta_by_hand(state, f))  # (C, D): one prompt
        rows.append(env.logit_scale * text @ f)
    return torch.stack(rows)


def view(state) -> RoundView:
    return RoundView(0, frozenset(), dict(state), dict(state), {})


# ---- the conditional prompt ----------------------------------------------------------------
def test_each_image_is_scored_with_its_own_prompt(clip):
    env = make_env(clip)
    state = random_state(env, 1)
    features = unit_features(5, clip.embed_dim, 2)
    got = FedCoCoOp(env).evaluator(view(state)).logits(0, features)
    with torch.no_grad():
        expected = logits_by_hand(env, state, features)
    assert got.shape == (5, len(CLASSES))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # two images get different prompts: image 0 scored with image 1's prompt is not what the method gives
    with torch.no_grad():
        shift0, shift1 = meta_by_hand(state, features[0]), meta_by_hand(state, features[1])
        borrowed = env.logit_scale * env.text_encoder(state["ctx"] + shift1) @ features[0]
    assert (shift0 - shift1).abs().max() > 1e-3
    assert (got[0] - borrowed).abs().max() > 1e-3


def test_local_training_is_sgd_on_the_per_image_loss_for_context_and_meta_net(clip):
    """One epoch of one batch is one SGD step (momentum buffer = first gradient, coupled weight decay)."""
    training = LocalTraining(local_epochs=1, lr=0.05, momentum=0.9, weight_decay=5e-4)
    env = make_env(clip, training)
    method = FedCoCoOp(env)
    state = random_state(env, 3)
    g = torch.Generator().manual_seed(4)
    images = torch.randn(3, 3, clip.image_size, clip.image_size, generator=g)
    labels = torch.tensor([0, 3, 1])
    job = ClientJob(
        client_id=2, round_index=0, server_state=state, client_state=None,
        batches=lambda: iter([(images, labels)]), num_examples=3, generator=torch.Generator().manual_seed(5),
    )
    before = {k: v.clone() for k, v in state.items()}
    result = method.train_client(job)

    params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
    features = clip.encode_images(images)
    loss = F.cross_entropy(logits_by_hand(env, params, features), labels)
    grads = torch.autograd.grad(loss, list(params.values()))
    expected = {k: p.detach() - training.lr * (gr + training.weight_decay * p.detach()) for (k, p), gr in zip(params.items(), grads)}

    assert set(result.upload) == {"ctx", *META} and result.client_state == {}
    assert result.train_loss == pytest.approx(float(loss.detach()), rel=1e-5)
    for key in expected:
        assert grads[list(params).index(key)].abs().max() > 0, key  # every tensor is trained
        torch.testing.assert_close(result.upload[key], expected[key], atol=1e-6, rtol=1e-5)
    assert all(torch.equal(state[k], before[k]) for k in state)  # the download is not mutated


# ---- evaluation in chunks -------------------------------------------------------------------
@pytest.mark.parametrize("max_sequences", [1, 12])
def test_chunked_evaluation_equals_unchunked_and_bounds_each_call(clip, monkeypatch, max_sequences):
    env = make_env(clip)
    state = random_state(env, 6)
    features = unit_features(5, clip.embed_dim, 7)
    whole = FedCoCoOp(env).evaluator(view(state)).logits(0, features)  # default: 4096 sequences, one call

    calls = []
    forward = env.text_encoder.forward

    def counting(ctx):
        calls.append(ctx.shape[0] if ctx.dim() == 3 else 1)
        return forward(ctx)

    monkeypatch.setattr(env.text_encoder, "forward", counting)
    chunked = FedCoCoOp(env, FedCoCoOpOptions(eval_max_sequences=max_sequences)).evaluator(view(state)).logits(0, features)
    per_call = max(1, max_sequences // len(CLASSES))
    assert calls == [min(per_call, 5 - start) for start in range(0, 5, per_call)]
    assert len(calls) > 1
    # the same cosines to 1e-6 (logits are s times them; only the GEMM blocking of the batch differs)
    torch.testing.assert_close(chunked / env.logit_scale, whole / env.logit_scale, atol=1e-6, rtol=0)


# ---- server ------------------------------------------------------------------------------------
def test_aggregation_is_sample_weighted_fedavg_of_context_and_every_meta_net_tensor(clip):
    env = make_env(clip)
    method = FedCoCoOp(env)
    start = method.initial_state()
    weights = {4: 11, 0: 3, 2: 5}
    uploads = {cid: random_state(env, 10 + cid) for cid in weights}
    results = {cid: ClientResult(upload=uploads[cid], client_state={}, num_examples=n, train_loss=0.0) for cid, n in weights.items()}
    new = method.aggregate(start, results, 0)
    assert set(new) == {"ctx", *META}
    total = sum(weights.values())
    for key in new:
        expected = sum(uploads[c][key].double() * n for c, n in weights.items()) / total
        assert new[key].dtype == torch.float32
        torch.testing.assert_close(new[key].double(), expected, atol=1e-7, rtol=1e-6)
    assert method.aggregate(start, {}, 0) == start


def test_initial_state_is_seeded_context_then_default_linear_init(clip):
    env = make_env(clip, seed=7)
    state = FedCoCoOp(env).initial_state()
    d, w = clip.embed_dim, env.text_encoder.width
    h = max(1, d // 16)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "ctx": (N_CTX, w), "meta.0.weight": (h, d), "meta.0.bias": (h,), "meta.2.weight": (w, h), "meta.2.bias": (w,)
    }
    assert all(v.dtype == torch.float32 for v in state.values())
    # the context is the shared training settings' initial context, drawn first from the "init" stream
    torch.testing.assert_close(state["ctx"], env.text_encoder.initial_context(torch_generator(7, "init")))
    for key, fan_in in (("meta.0.weight", d), ("meta.0.bias", d), ("meta.2.weight", h), ("meta.2.bias", h)):
        bound = 1 / math.sqrt(fan_in)
        assert state[key].abs().max() <= bound and state[key].abs().max() > 0.5 * bound, key
    again = FedCoCoOp(make_env(clip, seed=7)).initial_state()
    other = FedCoCoOp(make_env(clip, seed=8)).initial_state()
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert not torch.equal(state["meta.0.weight"], other["meta.0.weight"])


def test_with_the_last_meta_layer_zeroed_the_logits_are_promptfls(clip):
    env = make_env(clip)
    state = random_state(env, 8)
    state["meta.2.weight"].zero_()
    state["meta.2.bias"].zero_()
    features = unit_features(4, clip.embed_dim, 9)
    ours = FedCoCoOp(env).evaluator(view(state)).logits(1, features)
    theirs = PromptFL(env).evaluator(view({"ctx": state["ctx"]})).logits(1, features)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value", [0, -3, True, "many", 2.5])
def test_bad_options_are_refused_with_a_one_line_fix(value):
    with pytest.raises(ConfigError, match="eval_max_sequences must be a positive integer"):
        FedCoCoOpOptions(eval_max_sequences=value)
