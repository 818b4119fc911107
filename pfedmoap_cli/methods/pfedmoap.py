"""pFedMoAP: personalized federated prompt learning as a mixture of experts.

Luo, Chen, Wu, "Mixture of Experts Made Personalized: Federated Prompt
Learning for Vision-Language Models" (ICLR 2025, arXiv 2410.10114), as
PROTOCOL.md sections 2-4 and 7 define it.

Each round the sampled clients start from the global CoOp prompt. A client
that has trained before also downloads K non-local experts -- other clients'
latest prompts from the round-start pool P_{t-1} -- and learns, next to its
prompt, a private attention-based gating network that mixes the K+1 experts'
class features per image (:mod:`pfedmoap_cli.model.gating`). The server
averages the prompts (FedAvg, weighted by training-set size) into the next
global prompt and stores each participant's prompt in the pool (visible from
the next round). Gating networks never leave their client.

Deviations from the reference code (PROTOCOL.md section 7): per-client gating
and a fresh optimiser per client and round, ``nearest`` selection that works
(and is the default), a round-start pool snapshot, fp32 training, explicit
rules for clients that sat a round out or never trained.

Work shared exactly: one text-encoder pass per expert prompt per round
(:meth:`PFedMoAP.prepare_round`), reused by the evaluation after the round;
one gating pass per scored batch for both the logits and the attention
metrics; and :meth:`PFedMoAP.train_clients_batched`, the round's
participants trained in lock step (stacked prompts and gating networks).

Options (``--method-option KEY=VALUE``)
---------------------------------------
num_experts : int, default 9
    K, the number of NON-local experts (the reference's ``--num_experts`` minus 1).
expert_selection : {"nearest", "random"}, default "nearest"
    ``nearest``: the K pool prompts closest (Frobenius norm) to the client's
    own; ``random``: K drawn uniformly, seeded by (seed, round, client).
lam : float, default 0.5
    lambda, the weight of the local logits (Table 1 also reports 0).
gating_dim : int, default 128
    d_g, the pooled width; must divide the CLIP embedding width D.
gating_heads : int, default 8
    Attention heads; must divide ``gating_dim``.
gating_scaling : float, default 10.0
    sigma, the factor on ``Q K^T`` in place of ``1/sqrt(d_k)``.
gating_lr : float, default 0.01
    Constant SGD learning rate of the gating network (the prompt uses the
    run's ``--lr`` with the cosine schedule).
share_expert_features : bool, default True
    Encode every expert prompt once per round for all clients; ``False``
    re-encodes them per client (same numbers, slower; for benchmarks).

State
-----
server: ``ctx`` (n_ctx, W) the global prompt; ``pool`` (N, n_ctx, W) every
client's latest uploaded prompt and ``pool_mask`` (N,) which entries exist.
client: ``ctx`` its latest local prompt, ``gating.*`` its gating network, and
``expert_ids`` the client ids of the experts it last trained with.
download (per client): ``ctx`` the global prompt, ``experts`` (K, n_ctx, W) its
experts' prompts and ``expert_ids`` (K,) their client ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from pfedmoap_cli.engine.batched_round import run_local_epochs_batched
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.base import (
    ClientEvaluator,
    ClientJob,
    ClientResult,
    FederatedMethod,
    MethodEnv,
    RoundView,
    State,
    register_method,
)
from pfedmoap_cli.methods.local_training import cross_entropy, prompt_logits, run_local_epochs, weighted_average
from pfedmoap_cli.model.gating import GatingNetwork, batched_gating, mixture_logits, pool_features, pool_stride
from pfedmoap_cli.seeding import derive_seed, torch_generator

SELECTIONS = ("nearest", "random")
GATING_PREFIX = "gating."
#: Test images per gating call in :meth:`MixtureEvaluator.extra_metrics`.
EVAL_IMAGE_CHUNK = 256


# ---- options ----------------------------------------------------------------------------
def _fix(name: str, example: Any) -> str:
    return f"pass --method-option {name}={example}"


def _as_int(name: str, value: Any, minimum: int, example: int) -> int:
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral or int(value) < minimum:
        raise ConfigError(f"pfedmoap option {name} must be an integer >= {minimum}, got {value!r}; {_fix(name, example)}")
    return int(value)


def _as_float(name: str, value: Any, example: float, strictly_positive: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if strictly_positive else value >= 0)
    if not ok:
        bound = "> 0" if strictly_positive else ">= 0"
        raise ConfigError(f"pfedmoap option {name} must be a finite number {bound}, got {value!r}; {_fix(name, example)}")
    return float(value)


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "false"}:
        return value.lower() == "true"
    raise ConfigError(f"pfedmoap option {name} must be true or false, got {value!r}; {_fix(name, 'true')}")


@dataclass(frozen=True)
class PFedMoAPOptions:
    """pFedMoAP's hyperparameters (see the module docstring); validated on creation."""

    num_experts: int = 9
    expert_selection: str = "nearest"
    lam: float = 0.5
    gating_dim: int = 128
    gating_heads: int = 8
    gating_scaling: float = 10.0
    gating_lr: float = 0.01
    share_expert_features: bool = True

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen dataclass)
        set_("num_experts", _as_int("num_experts", self.num_experts, 0, 9))
        if self.expert_selection not in SELECTIONS:
            raise ConfigError(
                f"pfedmoap option expert_selection must be one of {', '.join(SELECTIONS)}, got {self.expert_selection!r}; "
                f"{_fix('expert_selection', 'nearest')}"
            )
        set_("lam", _as_float("lam", self.lam, 0.5, strictly_positive=False))
        set_("gating_dim", _as_int("gating_dim", self.gating_dim, 1, 128))
        set_("gating_heads", _as_int("gating_heads", self.gating_heads, 1, 8))
        if self.gating_dim % self.gating_heads != 0:
            raise ConfigError(
                f"pfedmoap option gating_heads={self.gating_heads} must divide gating_dim={self.gating_dim}; "
                f"{_fix('gating_heads', 'N')} with N a divisor of {self.gating_dim}"
            )
        set_("gating_scaling", _as_float("gating_scaling", self.gating_scaling, 10.0, strictly_positive=True))
        set_("gating_lr", _as_float("gating_lr", self.gating_lr, 0.01, strictly_positive=True))
        set_("share_expert_features", _as_bool("share_expert_features", self.share_expert_features))


def check_num_experts(num_experts: int, num_clients: int) -> None:
    """Refuse a K the federation cannot supply.

    The experts are the OTHER clients' prompts, so a federation of N clients
    has at most N - 1 of them. Called only where the user asked for K
    explicitly: a recipe's default K is a table's setting and is capped at
    the clients available, as :func:`select_experts` documents.

    Raises
    ------
    ConfigError
        Naming ``--num-experts`` and the largest K that fits.
    """
    if num_experts > num_clients - 1:
        raise ConfigError(
            f"--num-experts {num_experts} is more than this federation can supply: pFedMoAP's experts are the other "
            f"clients' prompts, at most {num_clients - 1} with {num_clients} clients; pass --num-experts {max(num_clients - 1, 0)} or fewer"
        )


# ---- expert selection -------------------------------------------------------------------
def select_experts(
    pool: torch.Tensor, available: torch.Tensor, client_id: int, k: int, selection: str, seed: int | None = None
) -> list[int]:
    """Client ids of up to ``k`` non-local experts for ``client_id``.

    Parameters
    ----------
    pool:
        (N, n_ctx, W) every client's latest prompt (rows with ``available`` False are ignored).
    available:
        (N,) bool, which pool entries exist.
    client_id:
        The client choosing; never chosen itself.
    k:
        How many to choose; all available ones when fewer exist.
    selection:
        ``nearest``: smallest Frobenius distance to ``pool[client_id]`` (ties go
        to the lower id), closest first. ``random``: uniformly without
        replacement from a generator seeded with ``seed``, returned sorted.
    seed:
        Required for ``random``; derive it from (experiment seed, round, client)
        so the draw does not depend on the order clients run in.
    """
    mask = available.detach().to("cpu", torch.bool)
    candidates = [j for j in range(mask.shape[0]) if bool(mask[j]) and j != client_id]
    if k <= 0 or not candidates:
        return []
    if selection == "nearest":
        if not bool(mask[client_id]):
            raise ValueError(f"client {client_id} has no pool entry to measure distances from")
        prompts = pool.detach().to("cpu", torch.float64)
        distances = (prompts[candidates] - prompts[client_id]).flatten(1).norm(dim=1).tolist()
        ranked = sorted(zip(distances, candidates))
        return [j for _, j in ranked[:k]]
    if selection == "random":
        if seed is None:
            raise ValueError("random expert selection needs a seed")
        if len(candidates) <= k:
            return candidates
        drawn = np.random.default_rng(seed).choice(len(candidates), size=k, replace=False)
        return sorted(candidates[int(i)] for i in drawn)
    raise ValueError(f"unknown expert selection {selection!r}")


@dataclass
class _ExpertCache:
    """Text features of the round's expert prompts, shared by every participant."""

    round_index: int
    rows: dict[int, int]  # client id -> row of ``prompts`` and ``features``
    prompts: torch.Tensor  # (P, n_ctx, W) the round-start pool entries encoded (checked against each download)
    features: torch.Tensor  # (P, C, D), no grad


def _prompt_key(prompt: torch.Tensor) -> bytes:
    """An exact identity of a float32 prompt (its bytes): equal keys, equal text features."""
    return prompt.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


def _expert_ids(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64, device=device)


# ---- the method -------------------------------------------------------------------------
@register_method
class PFedMoAP(FederatedMethod):
    name = "pfedmoap"
    global_part = None
    no_global_part_reason = "each client is scored with its own prompt, other clients' prompts as experts and its private gating network: there is no global model"
    Options = PFedMoAPOptions

    def __init__(self, env: MethodEnv, options: PFedMoAPOptions | None = None) -> None:
        super().__init__(env, options if options is not None else PFedMoAPOptions())
        pool_stride(env.clip.embed_dim, self.options.gating_dim)  # fail at start, not in round 1
        self._cache: _ExpertCache | None = None

    # -- state ----------------------------------------------------------------------------
    def initial_server_state(self, generator: torch.Generator) -> State:
        ctx = self.env.text_encoder.initial_context(generator)
        pool = torch.zeros((self.env.num_clients, *ctx.shape), dtype=torch.float32, device=ctx.device)
        return {"ctx": ctx, "pool": pool, "pool_mask": torch.zeros(self.env.num_clients, dtype=torch.bool, device=ctx.device)}

    def new_gating(self, client_id: int) -> GatingNetwork:
        """A client's gating network at its initial (seeded, default-Linear) weights."""
        opts = self.options
        generator = torch_generator(self.env.seed, "gating-init", client_id)
        gating = GatingNetwork(self.env.clip.embed_dim, opts.gating_dim, opts.gating_heads, opts.gating_scaling, generator=generator)
        return gating.to(self.env.device)

    def client_gating(self, client_state: Mapping[str, torch.Tensor] | None, client_id: int) -> GatingNetwork:
        """The client's own gating network: from its state, or freshly initialised."""
        gating = self.new_gating(client_id)
        saved = {k[len(GATING_PREFIX) :]: v for k, v in (client_state or {}).items() if k.startswith(GATING_PREFIX)}
        if saved:
            gating.load_state_dict(saved)
        return gating

    def experts_for(self, state: Mapping[str, torch.Tensor], client_id: int, round_index: int, purpose: str = "experts") -> list[int]:
        """Expert client ids for ``client_id`` from ``state``'s pool (none before its first upload)."""
        if self.options.num_experts == 0 or not bool(state["pool_mask"][client_id]):
            return []
        seed = derive_seed(self.env.seed, purpose, round_index, client_id)
        return select_experts(state["pool"], state["pool_mask"], client_id, self.options.num_experts, self.options.expert_selection, seed)

    def _with_experts(self, state: Mapping[str, torch.Tensor], ids: list[int]) -> State:
        """The global prompt and the pool entries ``ids``: what one client receives."""
        return {"ctx": state["ctx"], "experts": state["pool"][ids], "expert_ids": _expert_ids(ids, state["pool"].device)}

    def client_download(self, server_state: Mapping[str, torch.Tensor], client_id: int, round_index: int) -> State:
        """The global prompt and exactly this client's K experts (their prompts and client ids).

        The experts are chosen on the server from the round-start pool; the
        rest of the pool never leaves it.
        """
        return self._with_experts(server_state, self.experts_for(server_state, client_id, round_index))

    # -- the round ------------------------------------------------------------------------
    def prepare_round(self, round_index: int, start_state: Mapping[str, torch.Tensor], participants: tuple[int, ...]) -> None:
        """Encode every expert prompt the participants will use, in one batched pass.

        Expert features depend only on the prompt and the class names, so one
        text-encoder pass per pool entry serves every client that picks it.
        """
        self._cache = None
        if not self.options.share_expert_features:
            return
        ids = sorted({j for c in participants for j in self.experts_for(start_state, c, round_index)})
        prompts = start_state["pool"][ids]
        # Up to N prompts x C classes sequences (10,000 for CIFAR-100 with 100 clients): bounded calls.
        features = self.env.text_encoder.encode_many(prompts) if ids else torch.empty(0)
        self._cache = _ExpertCache(round_index, {j: row for row, j in enumerate(ids)}, prompts, features)

    def expert_features(self, download: Mapping[str, torch.Tensor], round_index: int) -> torch.Tensor | None:
        """(K, C, D) detached features of the downloaded experts, from the round cache when it holds them."""
        expert_ids = [int(j) for j in download["expert_ids"].tolist()]
        if not expert_ids:
            return None
        cache = self._cache
        if self.options.share_expert_features and cache is not None and cache.round_index == round_index and all(j in cache.rows for j in expert_ids):
            rows = [cache.rows[j] for j in expert_ids]
            # The cache is used only for exactly the prompts this client received.
            if torch.equal(cache.prompts[rows], download["experts"].to(cache.prompts.device)):
                return cache.features[rows]
        return self.env.text_encoder.encode_many(download["experts"])

    def train_client(self, job: ClientJob) -> ClientResult:
        env, opts, download = self.env, self.options, job.server_state
        expert_ids = [int(j) for j in download["expert_ids"].tolist()]
        experts = self.expert_features(download, job.round_index)
        ctx = torch.nn.Parameter(download["ctx"].detach().clone().to(env.device, torch.float32))
        gating = self.client_gating(job.client_state, job.client_id)

        def loss_fn(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            local = env.text_encoder(ctx)
            if experts is None:
                return cross_entropy(prompt_logits(features, local, env.logit_scale), labels)
            logits, _ = mixture_logits(features, torch.cat([local.unsqueeze(0), experts]), gating, opts.lam, env.logit_scale)
            return cross_entropy(logits, labels)

        groups = [{"params": [ctx], "lr": env.training.lr, "cosine": True}]
        if experts is not None:
            groups.append({"params": list(gating.parameters()), "lr": opts.gating_lr, "cosine": False})
        loss = run_local_epochs(job.batches, groups, loss_fn, env.training, env.clip.encode_images)

        trained = ctx.detach().clone()
        client_state: State = {"ctx": trained, "expert_ids": _expert_ids(expert_ids, trained.device)}
        client_state.update({GATING_PREFIX + k: v.detach().clone() for k, v in gating.state_dict().items()})
        return ClientResult(upload={"ctx": trained}, client_state=client_state, num_examples=job.num_examples, train_loss=loss)

    def train_clients_batched(self, jobs: Sequence[ClientJob]) -> list[ClientResult]:
        """:meth:`train_client` for every job at once, in lock step; results in the order of ``jobs``.

        Every participant's local prompt is one row of a stacked ``ctx``
        (B, n_ctx, W) and every gating parameter one row of a stacked (B, ...)
        tensor (:func:`~pfedmoap_cli.model.gating.batched_gating`). At each
        step the text encoder runs once on the local prompts of the clients
        that have a batch; each client's K experts come from the round's cache
        (:meth:`expert_features`). Clients with fewer experts than the most
        are padded with masked experts (attention weight exactly 0).

        A client without experts trains its prompt alone, as in
        :meth:`train_client`: its gating row is not used by its loss, and the
        state it keeps is its gating as it came in.
        """
        env, opts = self.env, self.options
        if not jobs:
            return []
        device = env.device
        expert_ids = [[int(j) for j in job.server_state["expert_ids"].tolist()] for job in jobs]
        experts = [self.expert_features(job.server_state, job.round_index) for job in jobs]
        gatings = [self.client_gating(job.client_state, job.client_id) for job in jobs]
        ctx = torch.nn.Parameter(torch.stack([job.server_state["ctx"].detach().to(device, torch.float32) for job in jobs]))
        gating = {
            name: torch.nn.Parameter(torch.stack([dict(g.named_parameters())[name].detach() for g in gatings]))
            for name, _ in gatings[0].named_parameters()
        }
        # Each client's non-local experts padded to the most any client has; mask[b, e] marks real experts (local = 0).
        most = max((len(e) for e in experts if e is not None), default=0)
        shape = (env.text_encoder.num_classes, env.clip.embed_dim)
        padded = torch.zeros(len(jobs), most, *shape, device=device)
        mask = torch.zeros(len(jobs), 1 + most, dtype=torch.bool, device=device)
        mask[:, 0] = True
        for row, features in enumerate(experts):
            if features is not None:
                padded[row, : len(features)] = features.to(device)
                mask[row, 1 : 1 + len(features)] = True

        def loss_fn(positions: list[int], features: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
            active = torch.tensor(positions, device=device)
            local = env.text_encoder(ctx.index_select(0, active))  # (P, C, D), one call for every client with a batch
            images = torch.nn.utils.rnn.pad_sequence(list(features), batch_first=True)  # (P, B_max, D), zero rows are padding
            logits = env.logit_scale * torch.bmm(images, local.transpose(1, 2))  # local logits (P, B_max, C)
            mixed_rows = [r for r, b in enumerate(positions) if experts[b] is not None]
            if mixed_rows:
                rows = torch.tensor(mixed_rows, device=device)
                clients = active.index_select(0, rows)
                stack = torch.cat([local.index_select(0, rows).unsqueeze(1), padded.index_select(0, clients)], dim=1)
                row_mask = mask.index_select(0, clients)
                params = {name: p.index_select(0, clients) for name, p in gating.items()}
                moe, _ = batched_gating(
                    params, images.index_select(0, rows), stack, opts.gating_heads, opts.gating_scaling, None if bool(row_mask.all()) else row_mask
                )
                pooled = pool_features(images.index_select(0, rows), opts.gating_dim)
                mixture = opts.lam * logits.index_select(0, rows) + env.logit_scale * torch.einsum("gbd,gbcd->gbc", pooled, moe)
                logits = logits.index_copy(0, rows, mixture)
            return torch.stack([cross_entropy(logits[r, : len(y)], y) for r, y in enumerate(labels)])

        groups = [{"params": [ctx], "lr": env.training.lr, "cosine": True}]
        if most > 0:
            groups.append({"params": list(gating.values()), "lr": opts.gating_lr, "cosine": False})
        losses = run_local_epochs_batched(jobs, groups, loss_fn, env.training, env.clip.encode_images)

        results = []
        for row, job in enumerate(jobs):
            trained = ctx[row].detach().clone()  # its own storage: a view would carry every client's rows
            state: State = {"ctx": trained, "expert_ids": _expert_ids(expert_ids[row], trained.device)}
            if experts[row] is not None:
                state.update({GATING_PREFIX + name: gating[name][row].detach().clone() for name in gatings[row].state_dict()})
            else:
                state.update({GATING_PREFIX + k: v.detach().clone() for k, v in gatings[row].state_dict().items()})
            results.append(ClientResult(upload={"ctx": trained}, client_state=state, num_examples=job.num_examples, train_loss=losses[row]))
        return results

    def aggregate(self, start_state: Mapping[str, torch.Tensor], results: Mapping[int, ClientResult], round_index: int) -> State:
        """FedAvg of the prompts into the global one; participants' prompts into the pool.

        The round's expert cache is kept until the next :meth:`prepare_round`:
        the evaluation after this round scores the participants with the very
        experts it holds.
        """
        if not results:
            return dict(start_state)
        order = sorted(results)  # a fixed order keeps the float sum independent of scheduling
        ctx = weighted_average([results[c].upload["ctx"] for c in order], [results[c].num_examples for c in order])
        pool, mask = start_state["pool"].clone(), start_state["pool_mask"].clone()
        for c in order:
            pool[c] = results[c].upload["ctx"].to(pool.device, pool.dtype)
            mask[c] = True
        return {"ctx": ctx.to(start_state["ctx"].device), "pool": pool, "pool_mask": mask}

    # -- evaluation -----------------------------------------------------------------------
    def evaluation_download(self, view: RoundView, client_id: int) -> State:
        """The global prompt and the experts a client is scored with (PROTOCOL.md section 3 step 5).

        * a participant: the experts it trained with, from the round-start pool
          P_{t-1} (the same seeded choice as its download);
        * a client that sat the round out: experts chosen as in training from
          the end-of-round pool P_t (a ``random`` draw seeded by
          (seed, "eval-experts", round, client));
        * a client that never trained: no experts (it is scored with the global prompt).
        """
        if client_id in view.participants:
            return self._with_experts(
                {"ctx": view.end_state["ctx"], "pool": view.start_state["pool"]}, self.experts_for(view.start_state, client_id, view.round_index)
            )
        return self._with_experts(view.end_state, self.experts_for(view.end_state, client_id, view.round_index, "eval-experts"))

    def evaluator(self, view: RoundView) -> ClientEvaluator:
        clients = range(self.env.num_clients)
        return MixtureEvaluator(self, {c: (self.evaluation_download(view, c), view.client_states.get(c)) for c in clients}, self.cached_features())

    def cached_features(self) -> dict[bytes, torch.Tensor]:
        """The expert cache's features by their prompt's bytes (empty without a cache).

        A prompt's features depend only on the prompt (the class names and the
        frozen encoder are fixed), so an exact byte match may be reused in any
        later call; it saves evaluation re-encoding the experts the
        participants trained with.
        """
        cache = self._cache
        if cache is None:
            return {}
        return {_prompt_key(cache.prompts[row]): cache.features[row] for row in cache.rows.values()}

    def node_evaluator(self, round_index: int, client_id: int, download: Mapping[str, torch.Tensor], client_state: State | None) -> ClientEvaluator:
        return MixtureEvaluator(self, {client_id: (download, client_state)})


# ---- evaluation -------------------------------------------------------------------------
@dataclass
class _ClientPlan:
    """How one client is scored: its expert features (local first), their ids, its gating."""

    expert_features: torch.Tensor  # (1 + K, C, D)
    expert_ids: list[int]  # client ids, local expert first
    gating: GatingNetwork | None


@dataclass
class _AttentionTally:
    """The attention :meth:`MixtureEvaluator.logits` already computed for one client.

    ``chunks`` are the image features it was computed on, in call order, and
    ``total`` (E,) float64 the per-expert sum over those images of the mean
    attention (over heads and classes).
    """

    chunks: list[torch.Tensor]
    total: torch.Tensor

    def covers(self, image_features: torch.Tensor) -> bool:
        """Whether the chunks, one after the other, are exactly ``image_features``."""
        if sum(len(chunk) for chunk in self.chunks) != len(image_features):
            return False
        offset = 0
        for chunk in self.chunks:
            if not torch.equal(chunk, image_features[offset : offset + len(chunk)]):
                return False
            offset += len(chunk)
        return True


class MixtureEvaluator(ClientEvaluator):
    """Scores clients from their evaluation downloads and their own states.

    A client with a prompt of its own is scored with it, its gating network and
    the experts of its download; a client that never trained, with the global
    prompt alone. Every distinct prompt needed is encoded once, in a few
    batched text-encoder calls, except those whose features ``known`` already
    holds (by :func:`_prompt_key`: the round's expert cache).

    The gating runs once per scored batch: :meth:`logits` keeps the attention
    it computes, and :meth:`extra_metrics` reuses it when called on exactly
    the images :meth:`logits` saw (as :func:`score_client` does).
    """

    def __init__(
        self,
        method: PFedMoAP,
        clients: Mapping[int, tuple[Mapping[str, torch.Tensor], State | None]],
        known: Mapping[bytes, torch.Tensor] | None = None,
    ) -> None:
        env, opts = method.env, method.options
        self.lam, self.logit_scale = opts.lam, env.logit_scale
        known = known or {}
        rows: dict[bytes, int] = {}
        prompts: list[torch.Tensor] = []
        reused: dict[int, torch.Tensor] = {}  # row -> features already computed

        def need(prompt: torch.Tensor) -> int:
            prompt = prompt.to(env.device, torch.float32)
            key = _prompt_key(prompt)  # identical prompts are encoded once
            if key not in rows:
                rows[key] = len(prompts)
                prompts.append(prompt)
                if key in known:
                    reused[rows[key]] = known[key]
            return rows[key]

        wanted: dict[int, tuple[list[int], list[int], GatingNetwork | None]] = {}
        for client, (download, state) in clients.items():
            if not state or "ctx" not in state:
                wanted[client] = ([need(download["ctx"])], [], None)
                continue
            ids = [int(j) for j in download["expert_ids"].tolist()]
            sources = [need(prompt) for prompt in download["experts"]]
            gating = method.client_gating(state, client) if ids else None
            wanted[client] = ([need(state["ctx"]), *sources], [client, *ids], gating)

        features = self._encode(env, prompts, reused)
        self.plans = {client: _ClientPlan(features[sources], ids, gating) for client, (sources, ids, gating) in wanted.items()}
        self._tallies: dict[int, _AttentionTally] = {}

    @staticmethod
    def _encode(env: MethodEnv, prompts: list[torch.Tensor], reused: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Features (P, C, D) of ``prompts``: rows in ``reused`` as given, the others encoded in one batched pass."""
        fresh = [row for row in range(len(prompts)) if row not in reused]
        encoded = env.text_encoder.encode_many(torch.stack([prompts[row] for row in fresh])) if fresh else None
        if not reused:
            return encoded
        features = torch.empty(len(prompts), env.text_encoder.num_classes, env.clip.embed_dim, device=env.device)
        for row, value in reused.items():
            features[row] = value.to(features.device)
        if fresh:
            features[fresh] = encoded.to(features.dtype)
        return features

    def logits(self, client_id: int, image_features: torch.Tensor) -> torch.Tensor:
        plan = self.plans[client_id]
        with torch.no_grad():
            logits, attention = mixture_logits(image_features, plan.expert_features, plan.gating, self.lam, self.logit_scale)
        if attention is not None:
            tally = self._tallies.setdefault(client_id, _AttentionTally([], torch.zeros(len(plan.expert_ids), dtype=torch.float64, device=attention.device)))
            tally.chunks.append(image_features)
            tally.total += attention.to(torch.float64).mean(dim=(1, 2)).sum(dim=0)
        return logits

    def extra_metrics(self, client_id: int, image_features: torch.Tensor) -> dict[str, float]:
        """Mean attention weight each expert received (over heads, classes and test images).

        Keys are ``attention_c<client id>`` (local expert under the client's own
        id); clients scored without experts report nothing. Reuses the
        attention :meth:`logits` computed on these very images, if it did.
        """
        plan = self.plans[client_id]
        tally = self._tallies.pop(client_id, None)
        if plan.gating is None or len(image_features) == 0:
            return {}
        if tally is not None and tally.covers(image_features):
            total = tally.total
        else:
            total = torch.zeros(len(plan.expert_ids), dtype=torch.float64, device=image_features.device)
            with torch.no_grad():
                for start in range(0, len(image_features), EVAL_IMAGE_CHUNK):
                    _, attention = plan.gating(image_features[start : start + EVAL_IMAGE_CHUNK], plan.expert_features)
                    total += attention.to(torch.float64).mean(dim=(1, 2)).sum(dim=0)
        means = (total / len(image_features)).tolist()
        return {f"attention_c{expert:04d}": float(value) for expert, value in zip(plan.expert_ids, means)}
