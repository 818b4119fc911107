"""FedPGP: its contrastive term, its private low-rank factors and its scoring, against plain computations.

Tiny random towers only; the end-to-end runs (resume, downloads, Flower) are the
registry-looped tests.
"""

from __future__ import annotations

import math

import pytest
import torch

import pfedmoap_cli.methods.fedpgp  # noqa: F401  (registers the method)
from conftest import method_env

from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.base import ClientJob, LocalTraining, MethodEnv, RoundView
from pfedmoap_cli.methods.fedpgp import FedPGP, FedPGPOptions
from pfedmoap_cli.model.backbone import BackboneSpec, load_backbone
from pfedmoap_cli.model.prompt import encode_texts

CLASSES = ["red circle", "blue square", "green star", "yellow ring", "purple cross"]
N_CTX = 4
RANK = 3


@pytest.fixture(scope="module")
def clip():
    return load_backbone(BackboneSpec("tiny-vit", None))


def make_env(clip, training: LocalTraining | None = None) -> MethodEnv:
    return method_env(clip, CLASSES, n_ctx=N_CTX, num_clients=4, training=training)


def data(clip, seed: int, n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed batches (images, labels) of 3 images each."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, clip.image_size, clip.image_size, generator=g)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    return [(images[i : i + 3], labels[i : i + 3]) for i in range(0, n, 3)]


def job(method, client_id: int, server_state, client_state, batches, round_index: int = 0) -> ClientJob:
    """A client's job as the engine builds it: from the method's download, not the whole server state."""
    return ClientJob(
        client_id=client_id,
        round_index=round_index,
        server_state=method.client_download(server_state, client_id, round_index),
        client_state=client_state,
        batches=lambda: iter(batches),
        num_examples=sum(len(labels) for _, labels in batches),
        generator=torch.Generator().manual_seed(100 + client_id),
    )


def big_factors(width: int, seed: int) -> dict[str, torch.Tensor]:
    """Private factors far from the N(0, 0.02^2) start, so that sigma + U V differs visibly from sigma."""
    g = torch.Generator().manual_seed(seed)
    return {"U": 0.5 * torch.randn(N_CTX, RANK, generator=g), "V": 0.5 * torch.randn(RANK, width, generator=g)}


# ---- the contrastive term --------------------------------------------------------------------
def test_contrastive_term_is_the_hand_computed_one_and_does_not_depend_on_the_images(clip):
    """With lr 0 a client's train loss is the loss at its start; (loss with mu) - (loss with mu = 0) is
    mu times the contrastive term, which we compute here from the three feature sets by hand."""
    mu, tau = 0.7, 0.3
    frozen = LocalTraining(local_epochs=1, lr=0.0, momentum=0.9, weight_decay=5e-4)
    env = make_env(clip, frozen)
    with_term = FedPGP(env, FedPGPOptions(rank=RANK, mu=mu, tau=tau))
    without = FedPGP(env, FedPGPOptions(rank=RANK, mu=0.0, tau=tau))
    start = with_term.initial_state()
    private = big_factors(env.text_encoder.width, 1)

    # t_0: the raw "X X X X <name>." prompts through CLIP's own text path (no learned context at all)
    t_0 = encode_texts(clip, [f"{' '.join(['X'] * N_CTX)} {name}." for name in CLASSES])
    with torch.no_grad():
        t_full = env.text_encoder(start["sigma"] + private["U"] @ private["V"])
        t_sig = env.text_encoder(start["sigma"])
    expected = 0.0
    for c in range(len(CLASSES)):
        a = float(t_0[c] @ t_sig[c] / (t_0[c].norm() * t_sig[c].norm()))
        b = float(t_sig[c] @ t_full[c] / (t_sig[c].norm() * t_full[c].norm()))
        expected += -math.log(math.exp(a / tau) / (math.exp(a / tau) + math.exp(b / tau)))
    expected /= len(CLASSES)
    assert 0.05 < expected < 5  # a real, non-degenerate term on these towers

    terms = []
    for seed in (2, 3):  # two different batches of images
        batches = data(clip, seed, n=3)
        total = with_term.train_client(job(with_term, 0, start, private, batches)).train_loss
        ce_only = without.train_client(job(without, 0, start, private, batches)).train_loss
        terms.append((total - ce_only) / mu)
    assert abs(terms[0] - terms[1]) < 1e-5, terms  # the term ignores the images
    assert terms[0] == pytest.approx(expected, abs=1e-4)


def test_contrastive_gradient_reaches_sigma_through_both_features_and_u_v_through_t_full(clip):
    """One plain SGD step from the same start: (step with mu) - (step without) is -lr * mu * the gradient
    of the hand-written term, for sigma (through t_sig and t_full) and for U, V (through t_full only)."""
    lr, mu, tau = 0.5, 2.0, 0.5
    env = make_env(clip, LocalTraining(local_epochs=1, lr=lr, momentum=0.0, weight_decay=0.0))
    with_term = FedPGP(env, FedPGPOptions(rank=RANK, mu=mu, tau=tau))
    without = FedPGP(env, FedPGPOptions(rank=RANK, mu=0.0))
    start = with_term.initial_state()
    private = big_factors(env.text_encoder.width, 11)
    batches = data(clip, 12, n=3)
    moved = with_term.train_client(job(with_term, 0, start, private, batches))
    plain = without.train_client(job(without, 0, start, private, batches))

    sigma = start["sigma"].clone().requires_grad_(True)
    u, v = private["U"].clone().requires_grad_(True), private["V"].clone().requires_grad_(True)
    t_0 = encode_texts(clip, [f"{' '.join(['X'] * N_CTX)} {name}." for name in CLASSES])
    t_full, t_sig = env.text_encoder(sigma + u @ v), env.text_encoder(sigma)
    a = (t_0 * t_sig).sum(-1) / (t_0.norm(dim=-1) * t_sig.norm(dim=-1))
    b = (t_sig * t_full).sum(-1) / (t_sig.norm(dim=-1) * t_full.norm(dim=-1))
    term = (-torch.log(torch.exp(a / tau) / (torch.exp(a / tau) + torch.exp(b / tau)))).mean()
    g_sigma, g_u, g_v = torch.autograd.grad(term, (sigma, u, v))
    for got, base, grad in (
        (moved.upload["sigma"], plain.upload["sigma"], g_sigma),
        (moved.client_state["U"], plain.client_state["U"], g_u),
        (moved.client_state["V"], plain.client_state["V"], g_v),
    ):
        expected = -lr * mu * grad
        assert expected.abs().max() > 1e-5
        assert torch.allclose(got - base, expected, atol=2e-6, rtol=1e-3)


def test_sigma_u_v_are_three_groups_at_the_shared_lr_constant_by_default(clip, monkeypatch):
    import pfedmoap_cli.methods.fedpgp as fedpgp

    seen = []

    def spy(batches, param_groups, loss_fn, training, encode_images, epochs=None):
        seen.append([(tuple(p.shape for p in g["params"]), g["lr"], g["cosine"]) for g in param_groups])
        return 0.0

    monkeypatch.setattr(fedpgp, "run_local_epochs", spy)
    env = make_env(clip)
    width = env.text_encoder.width
    for constant in (True, False):
        method = FedPGP(env, FedPGPOptions(rank=RANK, constant_lr=constant))
        method.train_client(job(method, 0, method.initial_state(), None, data(clip, 1, n=3)))
        shapes = [((N_CTX, width),), ((N_CTX, RANK),), ((RANK, width),)]
        assert seen[-1] == [(shape, env.training.lr, not constant) for shape in shapes]


def test_zeroshot_anchor_is_the_hand_written_prompt(clip):
    env = make_env(clip)
    method = FedPGP(env, FedPGPOptions(rank=RANK, anchor="zeroshot"))
    expected = encode_texts(clip, [f"a photo of a {name}." for name in CLASSES])
    assert torch.allclose(method.anchor_features(), expected, atol=1e-6)
    placeholder = FedPGP(env, FedPGPOptions(rank=RANK)).anchor_features()
    assert not torch.allclose(placeholder, expected, atol=1e-3)


# ---- privacy of U, V and the aggregation -------------------------------------------------------
def test_private_factors_never_travel_and_the_server_averages_sigma_only(clip):
    env = make_env(clip)
    method = FedPGP(env, FedPGPOptions(rank=RANK))
    start = method.initial_state()
    assert set(start) == {"sigma", "U_init", "V_init"}
    assert start["U_init"].shape == (N_CTX, RANK) and start["V_init"].shape == (RANK, env.text_encoder.width)
    u_init, v_init = start["U_init"].clone(), start["V_init"].clone()
    batches = {0: data(clip, 4), 2: data(clip, 5, n=3)}
    for c in batches:
        assert set(method.client_download(start, c, 0)) == {"sigma"}
    results = {c: method.train_client(job(method, c, start, None, batches[c])) for c in batches}
    for result in results.values():
        assert set(result.upload) == {"sigma"} and set(result.client_state) == {"U", "V"}
        # U and V trained, away from the shared start
        assert not torch.equal(result.client_state["U"], u_init) and not torch.equal(result.client_state["V"], v_init)
    end = method.aggregate(start, results, 0)
    assert torch.equal(end["U_init"], u_init) and torch.equal(end["V_init"], v_init)  # bit-identical on the server
    weights = {0: 6, 2: 3}
    by_hand = sum(results[c].upload["sigma"].double() * weights[c] for c in (0, 2)) / 9
    assert torch.allclose(end["sigma"].double(), by_hand, atol=1e-7)
    view = RoundView(0, frozenset(batches), start, end, {c: r.client_state for c, r in results.items()})
    for c in range(4):
        assert set(method.client_download(end, c, 1)) == {"sigma"}
        assert set(method.evaluation_download(view, c)) == {"sigma"}
    # a second round from the client's own factors: still only sigma goes up
    again = method.train_client(job(method, 0, end, results[0].client_state, batches[0], round_index=1))
    assert set(again.upload) == {"sigma"}


def test_every_client_starts_from_the_same_initial_factors(clip):
    """Two first-time clients with the same data and download train to the same (U, V): the start is shared."""
    env = make_env(clip)
    method = FedPGP(env, FedPGPOptions(rank=RANK))
    start = method.initial_state()
    batches = data(clip, 6)
    first = method.train_client(job(method, 1, start, None, batches))
    second = FedPGP(env, FedPGPOptions(rank=RANK)).train_client(job(method, 3, start, None, batches))
    explicit = method.train_client(job(method, 1, start, {"U": start["U_init"], "V": start["V_init"]}, batches))
    for key in ("U", "V"):
        assert torch.equal(first.client_state[key], second.client_state[key])
        assert torch.equal(first.client_state[key], explicit.client_state[key])


# ---- scoring -------------------------------------------------------------------------------
def test_test_logits_use_global_sigma_plus_the_clients_own_factors(clip):
    env = make_env(clip)
    method = FedPGP(env, FedPGPOptions(rank=RANK))
    start = method.initial_state()
    sigma = start["sigma"] + 0.1 * torch.randn(start["sigma"].shape, generator=torch.Generator().manual_seed(7))
    end = {"sigma": sigma, "U_init": start["U_init"], "V_init": start["V_init"]}
    states = {0: big_factors(env.text_encoder.width, 8)}
    features = env.clip.encode_images(data(clip, 9)[0][0])
    s = env.logit_scale

    def by_hand(u, v):
        with torch.no_grad():
            return s * features @ env.text_encoder(sigma + u @ v).t()

    evaluator = method.evaluator(RoundView(0, frozenset({0}), start, end, states))
    assert torch.allclose(evaluator.logits(0, features), by_hand(states[0]["U"], states[0]["V"]), atol=1e-5)
    never = by_hand(start["U_init"], start["V_init"])  # a client that never trained: the initial factors
    assert torch.allclose(evaluator.logits(2, features), never, atol=1e-5)
    assert not torch.allclose(never, by_hand(states[0]["U"], states[0]["V"]), atol=1e-2)
    # a node that knows only sigma and its own state scores the same
    download = method.evaluation_download(RoundView(0, frozenset({0}), start, end, states), 0)
    assert torch.allclose(method.node_evaluator(0, 0, download, states[0]).logits(0, features), evaluator.logits(0, features), atol=1e-6)
    assert torch.allclose(method.node_evaluator(0, 2, download, None).logits(2, features), never, atol=1e-6)


# ---- options ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, name",
    [({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"rank": True}, "rank"), ({"mu": -1}, "mu"),
     ({"tau": 0}, "tau"), ({"anchor": "clip"}, "anchor"), ({"constant_lr": 1}, "constant_lr")],
)
def test_options_are_checked_with_one_line_messages(bad, name):
    with pytest.raises(ConfigError) as error:
        FedPGPOptions(**bad)
    message = str(error.value)
    assert "\n" not in message and f"option {name}" in message and f"--method-option {name}=" in message


def test_option_defaults():
    options = FedPGPOptions()
    assert (options.rank, options.mu, options.tau, options.anchor, options.constant_lr) == (8, 0.5, 0.5, "placeholder", True)


def test_a_bad_rank_is_one_line_through_the_cli(cli):
    from conftest import one_line_error

    assert cli("partition", "--dataset", "synthetic", "--clients", "2", "--seed", "1", "--option", "train_per_class=1",
               "--option", "test_per_class=1").exit_code == 0
    line = one_line_error(cli("train", "--method", "fedpgp", "--backbone", "tiny-vit", "--method-option", "rank=0"))
    assert "fedpgp option rank must be a positive integer" in line and "--method-option rank=8" in line
