"""pFedMoAP's lock-step round: the batched gating equals the module, and a batched round
equals client-by-client training (uploads, states with gating weights, losses)."""

from __future__ import annotations

import pytest
import torch

from pfedmoap_cli.methods.base import ClientJob, LocalTraining, MethodEnv
from pfedmoap_cli.methods.pfedmoap import PFedMoAP, PFedMoAPOptions
from pfedmoap_cli.model.backbone import BackboneSpec, load_backbone
from pfedmoap_cli.model.gating import GatingNetwork, batched_gating
from pfedmoap_cli.model.prompt import PromptTextEncoder

CLASSES = ["red circle", "blue square", "green star", "yellow ring", "purple cross"]


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_batched_gating_equals_each_clients_module_with_masked_padding():
    """Three networks, each on its own images and its own number of experts (padded to the most)."""
    g = torch.Generator().manual_seed(0)
    dim, d_g, heads, classes, batch = 32, 16, 4, 5, 3
    counts = [3, 1, 2]  # experts per group, local one included
    modules = [GatingNetwork(dim, d_g, heads, scaling=10.0, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
    images = unit(torch.randn(3, batch, dim, generator=g))
    experts = [unit(torch.randn(n, classes, dim, generator=g)) for n in counts]
    padded = torch.zeros(3, max(counts), classes, dim)
    mask = torch.zeros(3, max(counts), dtype=torch.bool)
    for row, e in enumerate(experts):
        padded[row, : len(e)] = e
        mask[row, : len(e)] = True
    padded[1, 1:] = unit(torch.randn(2, classes, dim, generator=g))  # padding that would change the result if it were read
    params = {name: torch.stack([dict(m.named_parameters())[name] for m in modules]) for name, _ in modules[0].named_parameters()}
    with torch.no_grad():
        moe, attention = batched_gating(params, images, padded, heads, 10.0, mask)
    assert moe.shape == (3, batch, classes, d_g) and attention.shape == (3, batch, heads, classes, max(counts))
    for row, (module, e) in enumerate(zip(modules, experts)):
        with torch.no_grad():
            want_moe, want_attention = module(images[row], e)
        torch.testing.assert_close(moe[row], want_moe, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(attention[row, ..., : len(e)], want_attention, rtol=1e-5, atol=1e-6)
        assert torch.all(attention[row, ..., len(e) :] == 0)  # padding experts get exactly no weight


# ---- a round, batched and client by client -------------------------------------------------------
@pytest.fixture(scope="module")
def method_factory():
    clip = load_backbone(BackboneSpec("tiny-vit", None, init_seed=0))
    encoder = PromptTextEncoder(clip, CLASSES, n_ctx=2)

    def make(**options) -> PFedMoAP:
        env = MethodEnv(clip, encoder, tuple(CLASSES), 6, LocalTraining(local_epochs=2, lr=0.05), seed=3, device=torch.device("cpu"))
        return PFedMoAP(env, PFedMoAPOptions(**{"gating_dim": 16, "gating_heads": 4, "gating_lr": 0.2, "num_experts": 3, **options}))

    return clip, make


#: Training images per participant: different sizes, so clients run out of batches at different steps.
SIZES = {0: 11, 1: 4, 3: 7, 4: 9, 5: 2}
BATCH = 4


def make_job(clip, method, client, round_index, download, client_state) -> ClientJob:
    """A job whose epochs are seeded reshuffles of the client's own images (fresh streams on every call of this)."""
    data = torch.Generator().manual_seed(100 + client)
    images = torch.randn(SIZES[client], 3, clip.image_size, clip.image_size, generator=data)
    labels = torch.randint(0, len(CLASSES), (SIZES[client],), generator=data)
    shuffle = torch.Generator().manual_seed(200 + client)

    def batches():
        order = torch.randperm(len(labels), generator=shuffle)
        return [(images[order[s : s + BATCH]], labels[order[s : s + BATCH]]) for s in range(0, len(labels), BATCH)]

    return ClientJob(client, round_index, download, client_state, batches, len(labels), torch.Generator().manual_seed(client))


def round_setup(method):
    """Round 2 of a six-client federation: client 2 has no pool entry, client 5 trains for the first time."""
    g = torch.Generator().manual_seed(7)
    pool = 0.02 * torch.randn(6, 2, 64, generator=g)
    server = {"ctx": 0.02 * torch.randn(2, 64, generator=g), "pool": pool, "pool_mask": torch.tensor([True, True, False, True, True, False])}
    participants = (0, 1, 3, 4, 5)
    downloads = {c: method.client_download(server, c, 2) for c in participants}
    # client 1 received only one of its experts: fewer experts than the others (the padded, masked case)
    downloads[1] = {**downloads[1], "experts": downloads[1]["experts"][:1], "expert_ids": downloads[1]["expert_ids"][:1]}
    gating = {f"gating.{k}": v + 0.05 for k, v in method.new_gating(0).state_dict().items()}
    states = {0: {"ctx": pool[0].clone(), "expert_ids": torch.tensor([1]), **gating}, 3: None, 4: None, 1: None, 5: None}
    return server, participants, downloads, states


def test_batched_round_equals_client_by_client(method_factory, monkeypatch):
    clip, make = method_factory
    per_client, batched = make(), make()
    server, participants, downloads, states = round_setup(per_client)
    assert [downloads[c]["expert_ids"].numel() for c in participants] == [3, 1, 3, 3, 0]
    for method in (per_client, batched):
        method.prepare_round(2, server, participants)
    want = {c: per_client.train_client(make_job(clip, per_client, c, 2, downloads[c], states[c])) for c in participants}

    calls = []
    encoder = batched.env.text_encoder
    plain_forward = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda ctx: calls.append(tuple(ctx.shape)) or plain_forward(ctx))
    jobs = [make_job(clip, batched, c, 2, downloads[c], states[c]) for c in participants]
    got = dict(zip(participants, batched.train_clients_batched(jobs)))
    monkeypatch.undo()

    # the text encoder ran once per step on the local prompts of every client with a batch (no expert re-encoded)
    steps = 2 * -(-max(SIZES.values()) // BATCH)
    batches_at = [sum(1 for c in participants if SIZES[c] > step * BATCH) for step in range(steps // 2)] * 2
    assert [shape[0] for shape in calls] == batches_at
    for c in participants:
        assert set(got[c].upload) == {"ctx"} and set(got[c].client_state) == set(want[c].client_state), c
        torch.testing.assert_close(got[c].upload["ctx"], want[c].upload["ctx"], rtol=0, atol=1e-5)
        for key, value in want[c].client_state.items():
            torch.testing.assert_close(got[c].client_state[key], value, rtol=0, atol=1e-5, msg=f"client {c} {key}")
        assert got[c].train_loss == pytest.approx(want[c].train_loss, abs=1e-5)
        assert got[c].num_examples == SIZES[c]
        assert got[c].client_state["ctx"].untyped_storage().size() == 2 * 64 * 4  # its own storage, not the stack's
    # the comparison is not vacuous: prompts and the trained clients' gating weights moved
    for c in participants:
        assert (want[c].upload["ctx"] - server["ctx"]).abs().max() > 1e-3, c
    start = {c: per_client.client_gating(states[c], c).state_dict() for c in participants}
    for c in (0, 1, 3, 4):
        assert (want[c].client_state["gating.W_k.weight"] - start[c]["W_k.weight"]).abs().max() > 1e-3, c
    # a client without experts keeps its gating as it came in
    for key, value in start[5].items():
        assert torch.equal(got[5].client_state[f"gating.{key}"], value)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_batched_round_with_every_client_at_k_experts(method_factory, lam):
    """No padding and no first-timer (the common case), with and without the local logits' weight."""
    clip, make = method_factory
    per_client, batched = make(lam=lam, expert_selection="random"), make(lam=lam, expert_selection="random")
    server, _, _, _ = round_setup(per_client)
    participants = (0, 3, 4)
    downloads = {c: per_client.client_download(server, c, 2) for c in participants}
    for method in (per_client, batched):
        method.prepare_round(2, server, participants)
    want = [per_client.train_client(make_job(clip, per_client, c, 2, downloads[c], None)) for c in participants]
    got = batched.train_clients_batched([make_job(clip, batched, c, 2, downloads[c], None) for c in participants])
    for w, r in zip(want, got):
        for key, value in w.client_state.items():
            torch.testing.assert_close(r.client_state[key], value, rtol=0, atol=1e-5, msg=key)
        assert r.train_loss == pytest.approx(w.train_loss, abs=1e-5)


# ---- through the engine: the jobs, seeds and expert cache a real round uses ------------------------
def test_engine_round_batched_equals_client_by_client(tmp_path):
    from pathlib import Path

    from pfedmoap_cli.artifacts.partition import load_partition, save_partition
    from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
    from pfedmoap_cli.data.sources import open_dataset
    from pfedmoap_cli.engine.batched_round import has_batched_path, train_participants
    from pfedmoap_cli.engine.federation import Federation
    from pfedmoap_cli.engine.session import open_session
    from pfedmoap_cli.engine.settings import TrainSettings
    from pfedmoap_cli.engine.workspace import RunPaths, Workspace

    assert has_batched_path(PFedMoAP)
    workspace = Workspace(tmp_path)
    source = open_dataset("synthetic", Path("unused"), train_per_class=1, test_per_class=1)
    partition = build_partition(source, PartitionSettings("dirichlet", 4, seed=5, alpha=0.1), {"train_per_class": 1, "test_per_class": 1})
    partition, sha = load_partition(save_partition(partition, workspace.partitions_dir)[0])
    assert len({len(c.train) for c in partition.clients}) > 1  # clients of different sizes
    settings = TrainSettings(
        method="pfedmoap", rounds=2, local_epochs=2, batch_size=8, n_ctx=2, lr=0.05, backbone="tiny-vit", pretrained="none",
        device="cpu", batched=True, method_options={"gating_dim": 16, "gating_heads": 4, "num_experts": 2},
    )
    session = open_session(settings, partition, sha, Path("unused"), workspace.features_cache_dir, progress=False)
    federation = Federation(session, "pfedmoap-batched", RunPaths(workspace.run_dir("pfedmoap-batched")), progress=False)
    method = federation.method
    start = federation.initial_state()
    # round 0 (client by client) gives clients 0, 1, 3 pool entries; in round 1 client 2 trains for the first time
    method.prepare_round(0, start, (0, 1, 3))
    first = {c: federation.train_client(c, 0, method.client_download(start, c, 0), None) for c in (0, 1, 3)}
    server = method.aggregate(start, first, 0)
    states = {c: r.client_state for c, r in first.items()}
    participants = [3, 0, 2, 1]
    method.prepare_round(1, server, tuple(participants))
    expected = {c: federation.train_client(c, 1, method.client_download(server, c, 1), states.get(c)) for c in participants}
    batched = train_participants(federation, 1, participants, server, states)
    assert batched is not None and list(batched) == participants
    assert [expected[c].client_state["expert_ids"].numel() for c in (0, 1, 2, 3)] == [2, 2, 0, 2]
    for c in participants:
        assert set(batched[c].client_state) == set(expected[c].client_state)
        for key, value in expected[c].client_state.items():
            torch.testing.assert_close(batched[c].client_state[key], value, rtol=0, atol=1e-5, msg=f"client {c} {key}")
        torch.testing.assert_close(batched[c].upload["ctx"], expected[c].upload["ctx"], rtol=0, atol=1e-5)
        assert batched[c].train_loss == pytest.approx(expected[c].train_loss, abs=1e-5)
        assert (batched[c].bytes_down, batched[c].bytes_up) == (expected[c].bytes_down, expected[c].bytes_up)
