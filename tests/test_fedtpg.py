"""FedTPG: the prompt generator and the method against plain computations written here.

The generator is re-implemented below with torch.nn.functional ops and manual
per-head attention on the module's own weights; the method's FedAvg, its
local step and its evaluator are checked against that re-implementation.
Tiny random CLIP towers only.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pfedmoap_cli.methods.fedtpg  # noqa: F401  (registers the method)
from conftest import method_env

from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.base import ClientJob, ClientResult, LocalTraining, MethodEnv, RoundView
from pfedmoap_cli.methods.fedtpg import FedTPG, FedTPGOptions
from pfedmoap_cli.model.backbone import BackboneSpec, load_backbone
from pfedmoap_cli.model.prompt import encode_texts
from pfedmoap_cli.model.prompt_generator import PromptGenerator

CLASSES = ["red circle", "blue_square", "green star", "yellow ring", "purple cross"]
N_CTX = 4
PREFIX = "generator."


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip():
    return load_backbone(BackboneSpec("tiny-vit", None))


def make_env(clip, training: LocalTraining | None = None) -> MethodEnv:
    return method_env(clip, CLASSES, n_ctx=N_CTX, num_clients=3, training=training)


def batches_of(clip, seed: int, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, clip.image_size, clip.image_size, generator=g)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    return [(images[i : i + 2], labels[i : i + 2]) for i in range(0, n, 2)]


def job(method, client_id: int, server_state, batches) -> ClientJob:
    return ClientJob(
        client_id=client_id,
        round_index=0,
        server_state=method.client_download(server_state, client_id, 0),
        client_state=None,
        batches=lambda: iter(batches),
        num_examples=sum(len(y) for _, y in batches),
        generator=torch.Generator().manual_seed(client_id),
    )


def random_features(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---- the plain generator -----------------------------------------------------------------------
def plain_generator(weights: dict[str, torch.Tensor], features: torch.Tensor, heads: int) -> torch.Tensor:
    """Z = A + FF(A), A = MHA(LN(Q), LN(E), LN(E)), written with functional ops (weights without prefix)."""
    w = weights
    queries = w["queries"]
    n_ctx, width = queries.shape
    dim = features.shape[1]
    q_in = F.layer_norm(queries, (width,), w["ln_query.weight"], w["ln_query.bias"], eps=1e-5)
    e_in = F.layer_norm(features, (dim,), w["ln_text.weight"], w["ln_text.bias"], eps=1e-5)
    if "attn.in_proj_weight" in w:  # W == D: PyTorch packs the three projections
        wq, wk, wv = w["attn.in_proj_weight"].chunk(3)
    else:
        wq, wk, wv = w["attn.q_proj_weight"], w["attn.k_proj_weight"], w["attn.v_proj_weight"]
    bq, bk, bv = w["attn.in_proj_bias"].chunk(3)
    head = width // heads
    outputs = []
    for h in range(heads):
        cols = slice(h * head, (h + 1) * head)
        qh = q_in @ wq[cols].T + bq[cols]
        kh = e_in @ wk[cols].T + bk[cols]
        vh = e_in @ wv[cols].T + bv[cols]
        attention = torch.softmax(qh @ kh.T / math.sqrt(head), dim=-1)
        outputs.append(attention @ vh)
    attended = torch.cat(outputs, dim=1) @ w["attn.out_proj.weight"].T + w["attn.out_proj.bias"]
    hidden = F.layer_norm(attended, (width,), w["ff_norm.weight"], w["ff_norm.bias"], eps=1e-5)
    hidden = hidden @ w["ff_in.weight"].T + w["ff_in.bias"]
    value, gate = hidden[:, : 4 * width], hidden[:, 4 * width :]
    return attended + (value * F.gelu(gate)) @ w["ff_out.weight"].T + w["ff_out.bias"]


def unprefixed(state) -> dict[str, torch.Tensor]:
    assert all(k.startswith(PREFIX) for k in state)
    return {k[len(PREFIX) :]: v for k, v in state.items()}


def perturbed(module: PromptGenerator, seed: int) -> PromptGenerator:
    """Layer norms start at (1, 0) and biases at 0: perturb every weight so the test sees them all."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


# ---- the generator -------------------------------------------------------------------------------
@pytest.mark.parametrize("width,dim", [(64, 32), (16, 16)])
def test_generator_forward_equals_plain_functional_reimplementation(width, dim):
    module = perturbed(PromptGenerator(3, width, dim, num_heads=4, generator=torch.Generator().manual_seed(1)), 2)
    features = random_features(7, dim, 3)
    with torch.no_grad():
        z = module(features)
    assert z.shape == (3, width)
    weights = {k: v.detach() for k, v in module.state_dict().items()}
    assert torch.allclose(z, plain_generator(weights, features, heads=4), atol=1e-5)


def test_generator_depends_on_the_label_set_not_on_its_order():
    module = perturbed(PromptGenerator(N_CTX, 64, 32, num_heads=4, generator=torch.Generator().manual_seed(4)), 5)
    features = random_features(6, 32, 6)
    with torch.no_grad():
        z = module(features)
        shuffled = module(features[torch.tensor([3, 0, 5, 1, 4, 2])])
        other = module(random_features(6, 32, 7))
        subset = module(features[:3])
    assert z.shape == (N_CTX, 64)
    assert torch.allclose(z, shuffled, atol=1e-5)
    assert (z - other).abs().max() > 1e-3 and (z - subset).abs().max() > 1e-3


def test_generator_initialisation_is_seeded_and_leaves_the_global_rng_alone():
    rng = torch.random.get_rng_state()
    a = PromptGenerator(N_CTX, 64, 32, generator=torch.Generator().manual_seed(9))
    b = PromptGenerator(N_CTX, 64, 32, generator=torch.Generator().manual_seed(9))
    c = PromptGenerator(N_CTX, 64, 32, generator=torch.Generator().manual_seed(10))
    assert torch.equal(rng, torch.random.get_rng_state())
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    assert not torch.equal(a.queries, c.queries)
    assert abs(float(a.queries.detach().std()) - 0.02) < 0.006  # N(0, 0.02^2), 256 draws


def test_parameter_count_at_clip_vit_b_width_is_about_4_2_million():
    module = PromptGenerator(4, 512, 512, num_heads=4, generator=torch.Generator().manual_seed(0))
    count = sum(p.numel() for p in module.parameters())
    w = d = 512
    formula = 4 * w + 2 * w + 2 * d + 2 * w + (2 * w * w + 2 * w * d + 4 * w) + (8 * w * w + 8 * w) + (4 * w * w + w)
    assert count == formula == 4_206_080
    assert abs(count - 4.2e6) / 4.2e6 < 0.02


# ---- the method -----------------------------------------------------------------------------------
def test_state_is_every_generator_weight_and_context_conditions_on_bare_class_names(clip):
    env = make_env(clip)
    method = FedTPG(env)
    state = method.initial_state()
    again = FedTPG(env).initial_state()
    assert set(state) == {PREFIX + k for k in PromptGenerator(N_CTX, env.text_encoder.width, clip.embed_dim).state_dict()}
    assert all(torch.equal(state[k], again[k]) and state[k].dtype == torch.float32 for k in state)
    assert state[PREFIX + "queries"].shape == (N_CTX, env.text_encoder.width)
    bare = encode_texts(clip, [name.replace("_", " ") for name in CLASSES])
    z = method.context(state)
    assert z.shape == (N_CTX, env.text_encoder.width)
    assert torch.allclose(z, plain_generator(unprefixed(state), bare, heads=4), atol=1e-5)
    # a smaller label set is a different conditioning
    assert (method.context(state, CLASSES[:2]) - z).abs().max() > 1e-4


def test_local_step_is_sgd_on_the_ce_of_the_plain_generator_and_nothing_stays_private(clip):
    """One epoch, one batch: the first SGD step is p - lr * (dCE/dp + wd * p) for EVERY weight."""
    training = LocalTraining(local_epochs=1, lr=0.05, momentum=0.9, weight_decay=5e-4)
    env = make_env(clip, training)
    method = FedTPG(env)
    start = method.initial_state()
    batch = batches_of(clip, 11, n=2)
    result = method.train_client(job(method, 0, start, batch))
    assert result.client_state == {} and set(result.upload) == set(start)

    weights = {k: v.clone().requires_grad_(True) for k, v in unprefixed(start).items()}
    bare = encode_texts(clip, [name.replace("_", " ") for name in CLASSES])
    images, labels = batch[0]
    with torch.no_grad():
        features = clip.encode_images(images)
    text = env.text_encoder(plain_generator(weights, bare, heads=4))
    loss = F.cross_entropy(env.logit_scale * features @ text.T, labels)
    grads = dict(zip(weights, torch.autograd.grad(loss, list(weights.values()))))
    for key, value in weights.items():
        expected = value.detach() - training.lr * (grads[key] + training.weight_decay * value.detach())
        assert torch.allclose(result.upload[PREFIX + key], expected, atol=1e-5), key
    assert abs(result.train_loss - float(loss.detach())) < 1e-5


def test_aggregation_averages_every_weight_unweighted_by_default_and_by_size_when_weighted(clip):
    env = make_env(clip)
    start = FedTPG(env).initial_state()
    g = torch.Generator().manual_seed(21)
    uploads = {c: {k: v + torch.randn(v.shape, generator=g) for k, v in start.items()} for c in (2, 0, 5)}
    sizes = {2: 10, 0: 2, 5: 4}
    results = {c: ClientResult(upload=uploads[c], client_state={}, num_examples=sizes[c], train_loss=0.0) for c in uploads}
    plain = FedTPG(env).aggregate(start, results, 0)
    weighted = FedTPG(env, FedTPGOptions(weighted=True)).aggregate(start, results, 0)
    assert set(plain) == set(start) == set(weighted)
    for key in start:
        mean = sum(uploads[c][key].double() for c in uploads) / 3
        by_size = sum(uploads[c][key].double() * sizes[c] for c in uploads) / sum(sizes.values())
        assert torch.allclose(plain[key].double(), mean, atol=1e-6), key
        assert torch.allclose(weighted[key].double(), by_size, atol=1e-6), key
    assert FedTPG(env).aggregate(start, {}, 0) == start


def test_evaluator_scores_every_client_with_the_global_generator_over_all_classes(clip):
    env = make_env(clip)
    method = FedTPG(env)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(31)) for k, v in method.initial_state().items()}
    evaluator = method.evaluator(RoundView(0, frozenset({0}), state, state, {}))
    images = batches_of(clip, 12)[0][0]
    features = clip.encode_images(images)
    bare = encode_texts(clip, [name.replace("_", " ") for name in CLASSES])
    with torch.no_grad():
        text = env.text_encoder(plain_generator(unprefixed(state), bare, heads=4))
    expected = env.logit_scale * features @ text.T
    for client in (0, 2):
        logits = evaluator.logits(client, features)
        assert logits.shape == (2, len(CLASSES)) and torch.allclose(logits, expected, atol=1e-4)


def test_options_are_validated(clip):
    assert FedTPGOptions(weighted="true").weighted is True and FedTPGOptions(num_heads=8.0).num_heads == 8
    for bad in (dict(num_heads=0), dict(num_heads=True), dict(num_heads=2.5), dict(weighted="maybe"), dict(weighted=1)):
        with pytest.raises(ConfigError, match="fedtpg option"):
            FedTPGOptions(**bad)
    with pytest.raises(ConfigError, match="num_heads=3 must divide"):
        FedTPG(make_env(clip), FedTPGOptions(num_heads=3))
