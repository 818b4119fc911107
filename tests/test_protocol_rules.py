"""Rules of PROTOCOL.md sections 2-4 and 6 that a one-line change could break, each against an independent computation.

The optimiser (SGD with momentum, coupled weight decay, a cosine schedule over
the round's local epochs, constant gating lr), FedAvg weighted by training-set
size, the prompt a never-trained client is scored with, per-round client
sampling, PromptFL+FT's fine-tuning of the NEW global prompt, pFedPrompt's
memory, bounded expert encoding and what the run id binds. The reference
computations here are written out plainly from the protocol's formulas and
torch's documented SGD update, not taken from the implementation.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pfedmoap_cli.artifacts.checkpoint import load_checkpoint
from pfedmoap_cli.artifacts.partition import load_partition, save_partition
from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
from pfedmoap_cli.data.sources import open_dataset
from pfedmoap_cli.engine.federation import Federation
from pfedmoap_cli.engine.session import open_session
from pfedmoap_cli.engine.settings import TrainSettings, default_run_id
from pfedmoap_cli.engine.workspace import RunPaths, Workspace
from pfedmoap_cli.methods.base import ClientJob, ClientResult, LocalTraining, MethodEnv, RoundView
from pfedmoap_cli.methods.coop import train_prompt
from pfedmoap_cli.methods.pfedmoap import PFedMoAP, PFedMoAPOptions
from pfedmoap_cli.methods.promptfl import PromptFL
from pfedmoap_cli.methods.promptfl_ft import PromptFLFineTune, PromptFLFineTuneOptions
from pfedmoap_cli.model.backbone import BackboneSpec, load_backbone
from pfedmoap_cli.model.prompt import PromptTextEncoder
from pfedmoap_cli.seeding import sample_clients
from test_pfedmoap import reference_mixture  # the plain loop implementation of the gating maths

CLASSES = ["red circle", "blue square", "green star", "yellow ring"]
N_CTX = 2
#: A schedule long enough that cosine, momentum and weight decay all move the result measurably.
TRAINING = LocalTraining(local_epochs=3, lr=0.05, momentum=0.9, weight_decay=5e-4)


@pytest.fixture(scope="module")
def tiny():
    clip = load_backbone(BackboneSpec("tiny-vit", None, init_seed=0))
    return clip, PromptTextEncoder(clip, CLASSES, n_ctx=N_CTX)


def make_env(tiny, num_clients: int = 4, training: LocalTraining = TRAINING) -> MethodEnv:
    clip, encoder = tiny
    return MethodEnv(clip, encoder, tuple(CLASSES), num_clients, training, seed=3, device=torch.device("cpu"))


def fixed_batches(clip, seed: int, sizes=(3, 3)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, clip.image_size, clip.image_size, generator=g), torch.randint(0, len(CLASSES), (n,), generator=g))
        for n in sizes
    ]


def make_job(client_id, server_state, client_state, batches, round_index=0) -> ClientJob:
    return ClientJob(
        client_id, round_index, server_state, client_state, lambda: iter(batches), sum(len(y) for _, y in batches), torch.Generator().manual_seed(7)
    )


# ---- an independent SGD: torch.optim.SGD's documented update, written out -----------------
def reference_sgd(groups, loss_of, batches, epochs: int, momentum: float, weight_decay: float):
    """Train ``groups`` = [(tensors, base_lr, follows_cosine)] on ``batches`` for ``epochs``.

    Per step, for each parameter p with gradient g: g <- g + wd * p;
    buf <- g on the first step, else momentum * buf + g; p <- p - lr * buf.
    The lr of epoch e (0-based) is base_lr * (1 + cos(pi * e / epochs)) / 2 for
    cosine groups, base_lr otherwise. A fresh momentum buffer at the start.
    """
    params = [[t.detach().clone() for t in tensors] for tensors, _, _ in groups]
    buffers = [[None] * len(tensors) for tensors, _, _ in groups]
    for epoch in range(epochs):
        lrs = [lr * (1 + math.cos(math.pi * epoch / epochs)) / 2 if cosine else lr for _, lr, cosine in groups]
        for images, labels in batches:
            live = [[p.clone().requires_grad_(True) for p in group] for group in params]
            loss = loss_of(live, images, labels)
            grads = torch.autograd.grad(loss, [p for group in live for p in group])
            flat = iter(grads)
            for gi, group in enumerate(params):
                for pi, p in enumerate(group):
                    g = next(flat) + weight_decay * p
                    buffers[gi][pi] = g if buffers[gi][pi] is None else momentum * buffers[gi][pi] + g
                    group[pi] = p - lrs[gi] * buffers[gi][pi]
    return params


def coop_loss(clip, encoder):
    def loss_of(live, images, labels):
        (ctx,), = live
        with torch.no_grad():
            image = clip.encode_images(images)
        logits = clip.logit_scale * image @ encoder(ctx).t()
        return -torch.log_softmax(logits, dim=1)[torch.arange(len(labels)), labels].mean()

    return loss_of


def test_prompt_training_is_momentum_sgd_with_coupled_decay_and_a_cosine_over_the_local_epochs(tiny):
    clip, encoder = tiny
    env = make_env(tiny)
    method = PromptFL(env)
    start = 0.02 * torch.randn(N_CTX, encoder.width, generator=torch.Generator().manual_seed(1))
    batches = fixed_batches(clip, 2)
    trained, _ = train_prompt(method, make_job(0, {"ctx": start}, None, batches), start)
    loss_of = coop_loss(clip, encoder)
    (expected,), = reference_sgd([([start], 0.05, True)], loss_of, batches, 3, 0.9, 5e-4)
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-6)
    # the check can tell the rules apart: each alternative lands measurably elsewhere
    for alternative in (
        reference_sgd([([start], 0.05, False)], loss_of, batches, 3, 0.9, 5e-4),  # constant lr
        reference_sgd([([start], 0.05, True)], loss_of, batches, 3, 0.0, 5e-4),  # no momentum
        reference_sgd([([start], 0.05, True)], loss_of, batches, 3, 0.9, 5e-2),  # 100x weight decay
    ):
        assert (alternative[0][0] - expected).abs().max() > 20 * 1e-6


def test_pfedmoap_update_follows_the_protocol_optimiser_groups(tiny):
    """Prompt: run lr on the cosine; gating: gating_lr, constant; both momentum SGD with decay; experts constant."""
    clip, encoder = tiny
    env = make_env(tiny, num_clients=4, training=LocalTraining(local_epochs=2, lr=0.05, momentum=0.9, weight_decay=5e-4))
    method = PFedMoAP(env, PFedMoAPOptions(num_experts=2, gating_dim=16, gating_heads=4, gating_lr=0.3, lam=0.5))
    g = torch.Generator().manual_seed(4)
    pool = 0.02 * torch.randn(4, N_CTX, encoder.width, generator=g)
    global_ctx = 0.02 * torch.randn(N_CTX, encoder.width, generator=g)
    server = {"ctx": global_ctx, "pool": pool, "pool_mask": torch.ones(4, dtype=torch.bool)}
    own = {f"gating.{k}": v for k, v in method.new_gating(0).state_dict().items()}
    state = {"ctx": pool[0].clone(), "expert_ids": torch.tensor([1]), **own}
    batches = fixed_batches(clip, 5)
    download = method.client_download(server, 0, 2)
    result = method.train_client(make_job(0, download, state, batches, round_index=2))
    expert_ids = result.client_state["expert_ids"].tolist()
    distances = {j: float((pool[j] - pool[0]).norm()) for j in (1, 2, 3)}
    assert expert_ids == sorted(distances, key=distances.get)[:2]  # the two nearest, closest first
    assert download["expert_ids"].tolist() == expert_ids and torch.equal(download["experts"], pool[expert_ids])
    with torch.no_grad():
        experts = encoder(pool[expert_ids])
    names = sorted(k[len("gating.") :] for k in own)

    def loss_of(live, images, labels):
        (ctx,), gating = live
        with torch.no_grad():
            image = clip.encode_images(images)
        stack = torch.cat([encoder(ctx).unsqueeze(0), experts])
        logits, _, _ = reference_mixture(image, stack, dict(zip(names, gating)), 4, 10.0, 0.5, clip.logit_scale)
        return -torch.log_softmax(logits, dim=1)[torch.arange(len(labels)), labels].mean()

    (ctx,), gating = reference_sgd(
        [([global_ctx], 0.05, True), ([own[f"gating.{n}"] for n in names], 0.3, False)], loss_of, batches, 2, 0.9, 5e-4
    )
    torch.testing.assert_close(result.client_state["ctx"], ctx, rtol=1e-4, atol=1e-6)
    for name, expected in zip(names, gating):
        torch.testing.assert_close(result.client_state[f"gating.{name}"], expected, rtol=1e-4, atol=1e-6)


# ---- the server ----------------------------------------------------------------------------
def test_pfedmoap_fedavg_weights_prompts_by_training_set_size(tiny):
    env = make_env(tiny)
    method = PFedMoAP(env, PFedMoAPOptions(gating_dim=16, gating_heads=4))
    start = method.initial_server_state(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(8)
    uploads = {c: torch.randn(N_CTX, env.text_encoder.width, generator=g) for c in (0, 2, 3)}
    sizes = {0: 2, 2: 5, 3: 11}
    results = {c: ClientResult({"ctx": uploads[c]}, {}, sizes[c], 0.0) for c in uploads}
    end = method.aggregate(start, results, 0)
    expected = (2 * uploads[0].double() + 5 * uploads[2].double() + 11 * uploads[3].double()) / 18
    torch.testing.assert_close(end["ctx"].double(), expected, rtol=0, atol=1e-6)
    assert (end["ctx"].double() - sum(u.double() for u in uploads.values()) / 3).abs().max() > 1e-2  # unweighted differs
    # the pool holds each participant's own upload; client 1 did not take part
    assert end["pool_mask"].tolist() == [True, False, True, True]
    for c in uploads:
        assert torch.equal(end["pool"][c], uploads[c])


# ---- evaluation ----------------------------------------------------------------------------
@pytest.mark.parametrize("method_name", ["promptfl", "fedprox", "pfedprompt", "pfedmoap"])
def test_a_never_trained_client_is_scored_with_the_round_end_global_prompt(tiny, method_name):
    from pfedmoap_cli.engine.session import method_options
    from pfedmoap_cli.methods.base import get_method

    clip, encoder = tiny
    env = make_env(tiny)
    cls = get_method(method_name)
    options = {"gating_dim": 16, "gating_heads": 4} if method_name == "pfedmoap" else {}
    method = cls(env, method_options(cls, options))
    g = torch.Generator().manual_seed(6)
    start = method.initial_server_state(g)
    end = dict(start, ctx=0.02 * torch.randn(N_CTX, encoder.width, generator=g))
    evaluator = method.evaluator(RoundView(4, frozenset({1}), start, end, {}))
    features = clip.encode_images(torch.randn(5, 3, clip.image_size, clip.image_size, generator=g))
    with torch.no_grad():
        expected = clip.logit_scale * features @ encoder(end["ctx"]).t()
        wrong = clip.logit_scale * features @ encoder(start["ctx"]).t()
    assert (expected - wrong).abs().max() > 1e-3
    torch.testing.assert_close(evaluator.logits(3, features), expected, rtol=1e-5, atol=1e-5)


# ---- sampling ------------------------------------------------------------------------------
def test_each_round_samples_its_own_participants():
    """m = max(floor(frac N), 1) distinct clients per round, redrawn every round, each client about frac of the rounds."""
    rounds = [sample_clients(10, 0.3, 1, t) for t in range(300)]
    assert all(len(p) == 3 == len(set(p)) and all(0 <= c < 10 for c in p) for p in rounds)
    assert len({tuple(p) for p in rounds}) > 60  # 120 possible sets; a fixed draw would give 1
    counts = [sum(c in p for p in rounds) for c in range(10)]
    # Binomial(300, 0.3): mean 90, std 7.9; 4 std either side.
    assert all(58 <= n <= 122 for n in counts), counts
    assert rounds != [sample_clients(10, 0.3, 2, t) for t in range(300)]  # the experiment seed matters
    assert sample_clients(10, 0.05, 1, 0) and len(sample_clients(10, 0.05, 1, 0)) == 1
    assert sample_clients(7, 1.0, 1, 5) == list(range(7))


# ---- a tiny federation on the synthetic world -----------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    workspace = Workspace(root)
    options = {"train_per_class": 2, "test_per_class": 1}
    source = open_dataset("synthetic", Path("unused"), **options)
    partition = build_partition(source, PartitionSettings("iid", 4, seed=3), options)
    path, _ = save_partition(partition, workspace.partitions_dir)
    partition, sha = load_partition(path)
    return workspace, partition, sha


def session_of(world, method: str, **changes):
    workspace, partition, sha = world
    settings = TrainSettings(
        method=method, rounds=2, local_epochs=1, frac=0.5, batch_size=8, n_ctx=2, lr=0.05, seed=5,
        backbone="tiny-vit", pretrained="none", device="cpu", **{"keep_rounds": "all", **changes},  # earlier rounds are read back
    )
    return open_session(settings, partition, sha, Path("unused"), workspace.features_cache_dir, progress=False)


def test_promptfl_ft_fine_tunes_the_new_global_prompt_for_every_client(tiny, world):
    workspace = world[0]
    ft_session, fl_session = session_of(world, "promptfl-ft"), session_of(world, "promptfl")
    ft = Federation(ft_session, "ft", RunPaths(workspace.run_dir("ft")), progress=False)
    fl = Federation(fl_session, "fl", RunPaths(workspace.run_dir("fl")), progress=False)
    assert ft.run() == 2 and fl.run() == 2
    assert sample_clients(4, 0.5, 5, 0) != sample_clients(4, 0.5, 5, 1)  # some client sits each round out
    previous = None
    for round_index in range(2):
        ft_server, ft_clients = ft.load_round(round_index)
        fl_server, _ = fl.load_round(round_index)
        # the federation keeps training the global prompt exactly as PromptFL does
        assert torch.equal(ft_server["ctx"], fl_server["ctx"])
        # every client, participant or not, holds a prompt fine-tuned from THIS round's global prompt
        assert sorted(ft_clients) == [0, 1, 2, 3]
        for client_id, state in ft_clients.items():
            job = ft.client_job(client_id, round_index, ft_server, None, stream="personalize")
            env = ft_session.method.env
            loss_of = coop_loss(env.clip, env.text_encoder)
            batches = list(job.batches())
            (expected,), = reference_sgd([([ft_server["ctx"]], 0.05, True)], loss_of, batches, 1, 0.9, 5e-4)
            torch.testing.assert_close(state["ft_ctx"], expected, rtol=1e-4, atol=1e-6)
            if previous is not None:
                assert not torch.equal(state["ft_ctx"], previous[client_id])  # never a stale prompt
        previous = {c: s["ft_ctx"] for c, s in ft_clients.items()}
    # each client's recorded accuracy is that of its fine-tuned prompt, computed here from the checkpoint
    import pandas as pd

    frame = pd.read_csv(ft.paths.metrics_csv)
    _, clients = ft.load_round(1)
    env = ft_session.method.env
    for client_id, state in clients.items():
        index = torch.tensor(ft_session.partition.clients[client_id].test)
        with torch.no_grad():
            predictions = (ft_session.test_features[index] @ env.text_encoder(state["ft_ctx"]).t()).argmax(dim=1)
        accuracy = float((predictions == ft_session.test_labels[index]).double().mean())
        row = frame[(frame["round"] == 1) & (frame.client_id == client_id) & (frame.metric == "accuracy") & (frame.split == "test")]
        assert float(row.value.iloc[0]) == pytest.approx(accuracy, abs=1e-9)


def test_promptfl_ft_epochs_default_to_local_epochs_and_are_validated(tiny):
    from pfedmoap_cli.errors import ConfigError

    clip, encoder = tiny
    env = make_env(tiny)
    start = 0.02 * torch.randn(N_CTX, encoder.width, generator=torch.Generator().manual_seed(2))
    batches = fixed_batches(clip, 9)
    loss_of = coop_loss(clip, encoder)
    default = PromptFLFineTune(env).personalize_client(make_job(1, {"ctx": start}, {"ft_ctx": start + 1}, batches))
    (expected,), = reference_sgd([([start], 0.05, True)], loss_of, batches, 3, 0.9, 5e-4)
    torch.testing.assert_close(default["ft_ctx"], expected, rtol=1e-5, atol=1e-6)
    two = PromptFLFineTune(env, PromptFLFineTuneOptions(ft_epochs=2)).personalize_client(make_job(1, {"ctx": start}, None, batches))
    (expected,), = reference_sgd([([start], 0.05, True)], loss_of, batches, 2, 0.9, 5e-4)
    torch.testing.assert_close(two["ft_ctx"], expected, rtol=1e-5, atol=1e-6)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ConfigError, match="ft_epochs"):
            PromptFLFineTuneOptions(ft_epochs=bad)


def test_pfedprompt_memory_is_the_test_transform_features_and_leaves_training_order_alone(world):
    workspace = world[0]
    session = session_of(world, "pfedprompt")
    federation = Federation(session, "mem", RunPaths(workspace.run_dir("mem")), progress=False)
    client = session.partition.clients[2]
    download = session.method.client_download(federation.initial_state(), 2, 0)
    job = federation.client_job(2, 0, download, None)
    memory = session.method.build_memory(job)
    transform = session.clip.test_transform()
    samples = [session.train_samples[i] for i in client.train]
    with torch.no_grad():
        expected = session.clip.encode_images(torch.stack([transform(session.source.load_image(s)) for s in samples]))
    torch.testing.assert_close(memory["memory_features"], expected.float(), rtol=1e-5, atol=1e-6)
    assert memory["memory_labels"].tolist() == [s.label for s in samples]
    # building the memory draws from no stream: the training epochs are the same with or without it
    with_memory = federation.client_job(2, 0, download, None)
    session.method.build_memory(with_memory)
    first = [(x.clone(), y.clone()) for x, y in with_memory.batches()]
    plain = federation.client_job(2, 0, download, None)
    second = list(plain.batches())
    assert len(first) == len(second)
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


# ---- bounded text-encoder calls --------------------------------------------------------------
def test_many_prompts_are_encoded_in_bounded_calls(tiny, monkeypatch):
    import pfedmoap_cli.model.prompt as prompt_module

    clip, encoder = tiny
    env = make_env(tiny, num_clients=7)
    method = PFedMoAP(env, PFedMoAPOptions(num_experts=6, gating_dim=16, gating_heads=4))
    g = torch.Generator().manual_seed(12)
    pool = 0.02 * torch.randn(7, N_CTX, encoder.width, generator=g)
    with torch.no_grad():
        whole = encoder(pool)
    calls = []
    original = PromptTextEncoder.forward

    def counting(self, ctx):
        calls.append(1 if ctx.dim() == 2 else ctx.shape[0])
        return original(self, ctx)

    monkeypatch.setattr(PromptTextEncoder, "forward", counting)
    monkeypatch.setattr(prompt_module, "MAX_SEQUENCES_PER_CALL", 2 * len(CLASSES))  # two prompts per call
    state = {"ctx": pool[0], "pool": pool, "pool_mask": torch.ones(7, dtype=torch.bool)}
    method.prepare_round(3, state, tuple(range(7)))
    assert calls and max(calls) <= 2 and sum(calls) == 7  # every pool prompt once, two at a time
    calls.clear()
    download = {"ctx": pool[0], "experts": pool[[4, 1, 6]], "expert_ids": torch.tensor([4, 1, 6])}
    torch.testing.assert_close(method.expert_features(download, 3), whole[[4, 1, 6]], rtol=1e-5, atol=1e-6)
    assert calls == []  # served from the round's batched pass, not encoded again
    ids = method.experts_for(state, 2, 3)
    assert sorted(ids) == [0, 1, 3, 4, 5, 6]  # every other client, nearest first
    torch.testing.assert_close(method.expert_features(method.client_download(state, 2, 3), 3), whole[ids], rtol=1e-5, atol=1e-6)
    assert calls == []
    torch.testing.assert_close(encoder.encode_many(pool, max_sequences=3 * len(CLASSES)), whole, rtol=1e-5, atol=1e-6)
    assert calls == [3, 3, 1]
    assert encoder.encode_many(pool, max_sequences=1).shape == whole.shape  # at least one prompt per call


# ---- the run id ------------------------------------------------------------------------------
def test_prompt_truncation_and_evaluation_batch_are_part_of_the_run_id():
    """Exact in fp32, not under bf16 on a GPU: runs with and without it are different runs."""
    truncated = TrainSettings(backbone="tiny-vit", pretrained="none", truncate_prompts=True)
    full = TrainSettings(backbone="tiny-vit", pretrained="none", truncate_prompts=False)
    assert default_run_id(truncated, "synthetic", "p" * 64) != default_run_id(full, "synthetic", "p" * 64)
    # FedOTP's transport stops on a batch-wide error, so the evaluation batch is part of a run too
    assert default_run_id(truncated, "synthetic", "p" * 64) != default_run_id(
        TrainSettings(backbone="tiny-vit", pretrained="none", eval_batch_size=7), "synthetic", "p" * 64
    )
    # the device is not (a run resumes on another machine); what it changes is recorded in run.json
    assert default_run_id(truncated, "synthetic", "p" * 64) == default_run_id(
        TrainSettings(backbone="tiny-vit", pretrained="none", device="cuda"), "synthetic", "p" * 64
    )


def test_a_client_without_test_images_stops_evaluation_instead_of_being_skipped(world):
    """Skipping it would average the headline over fewer clients unnoticed (partitions refuse it earlier too)."""
    import dataclasses

    from pfedmoap_cli.errors import DataError

    workspace = world[0]
    session = session_of(world, "promptfl")
    clients = list(session.partition.clients)
    clients[1] = dataclasses.replace(clients[1], test=())
    session.partition = dataclasses.replace(session.partition, clients=tuple(clients))
    federation = Federation(session, "empty", RunPaths(workspace.run_dir("empty")), progress=False)
    state = federation.initial_state()
    with pytest.raises(DataError, match="client 1 .*no test samples"):
        federation.evaluate(RoundView(0, frozenset(), state, state, {}))


def test_a_first_participation_is_plain_coop_on_the_global_prompt(tiny):
    """No experts yet: logits = local logits with no lambda factor, and no gating trains (PROTOCOL.md section 2)."""
    clip, encoder = tiny
    env = make_env(tiny)
    method = PFedMoAP(env, PFedMoAPOptions(num_experts=3, gating_dim=16, gating_heads=4, lam=0.5))
    g = torch.Generator().manual_seed(13)
    global_ctx = 0.02 * torch.randn(N_CTX, encoder.width, generator=g)
    pool = 0.02 * torch.randn(4, N_CTX, encoder.width, generator=g)
    mask = torch.tensor([False, True, True, True])  # others have uploaded; client 0 never has
    batches = fixed_batches(clip, 14)
    download = method.client_download({"ctx": global_ctx, "pool": pool, "pool_mask": mask}, 0, 3)
    assert set(download) == {"ctx", "experts", "expert_ids"} and torch.equal(download["ctx"], global_ctx)
    assert download["experts"].shape == (0, N_CTX, encoder.width) and download["expert_ids"].shape == (0,)
    result = method.train_client(make_job(0, download, None, batches, round_index=3))
    assert result.client_state["expert_ids"].tolist() == []
    (expected,), = reference_sgd([([global_ctx], 0.05, True)], coop_loss(clip, encoder), batches, 3, 0.9, 5e-4)
    torch.testing.assert_close(result.upload["ctx"], expected, rtol=1e-5, atol=1e-6)


# ---- what a run reports (section 4) ------------------------------------------------------------
def test_run_summary_is_the_last_round_mean_over_clients_and_the_last_five_rounds():
    import pandas as pd

    from pfedmoap_cli.report.runs import summarize_metrics

    # 8 rounds, 3 clients of 10, 30 and 60 test images; client c's accuracy in round t is (t + 1) * (c + 1) / 40
    sizes = {0: 10, 1: 30, 2: 60}
    rows = []
    for t in range(8):
        for c, n in sizes.items():
            base = dict(run_id="r", method="m", dataset="d", partition_sha256="p", seed=1, round=t, client_id=c, domain="", num_examples=n)
            rows.append({**base, "split": "test", "metric": "accuracy", "value": (t + 1) * (c + 1) / 40})
            rows.append({**base, "split": "test", "metric": "loss", "value": 9.0})
    summary = summarize_metrics(pd.DataFrame(rows))
    # worked out by hand: round t's client mean is (t + 1) * 2 / 40 = (t + 1) / 20
    assert summary.final_mean_acc == pytest.approx(100 * 8 / 20)
    assert summary.last5_mean_acc == pytest.approx(100 * (4 + 5 + 6 + 7 + 8) / 5 / 20)  # rounds 3..7
    assert summary.final_weighted_acc == pytest.approx(100 * 8 * (10 * 1 + 30 * 2 + 60 * 3) / 100 / 40)
    assert (summary.min_client_acc, summary.max_client_acc) == pytest.approx((100 * 8 / 40, 100 * 24 / 40))
    assert summary.rounds == 8 and summary.clients == 3


# ---- transforms (section 1) -----------------------------------------------------------------------
def test_test_transform_is_a_bicubic_resize_of_the_short_side_and_a_centre_crop():
    """Written with PIL alone: short side to the image size (bicubic), centre crop, CLIP normalisation."""
    import numpy as np
    from PIL import Image

    from pfedmoap_cli.model.transforms import test_transform

    size, mean, std = 24, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))  # 53 wide, 37 high
    width = int(size * 53 / 37)
    resized = image.resize((width, size), Image.BICUBIC)
    left = int(round((width - size) / 2.0))
    cropped = np.asarray(resized.crop((left, 0, left + size, size)), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(cropped).permute(2, 0, 1) - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(test_transform(size, mean, std)(image), expected, rtol=0, atol=1e-6)
    bilinear = np.asarray(image.resize((width, size), Image.BILINEAR).crop((left, 0, left + size, size)), dtype=np.float32) / 255.0
    assert np.abs(bilinear - cropped).max() > 1e-2  # the interpolation is visible
