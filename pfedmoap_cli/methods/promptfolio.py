"""PromptFolio: a global and a local prompt, mixed in the text-feature space.

Bikang Pan, Wei Huang and Ye Shi, "Federated Learning from Vision-Language
Foundation Models: Theoretical Analysis and Method" (NeurIPS 2024);
PROTOCOL-MORE.md section 2.

Two contexts of the same "X X ... X <name>." template: ``G`` (n_ctx, W),
global (held by the server, FedAvg), and ``L_k`` (n_ctx, W), client k's own,
which never leaves the client. With ``t_c(Z)`` the normalised text feature of
class c under context Z, ``f`` the normalised image feature and
``s = exp(logit_scale)``, the logits (training and test) are

    logits_c = s * < f, (1 - theta) t_c(G) + theta t_c(L_k) >

the mixture of the two (normalised) features NOT re-normalised. theta = 0 is
PromptFL (only G), theta = 1 is CoOp (only L_k).

A participant downloads G, trains its copy G_k and its L_k jointly (both
start the round from where they are: G_k = G, L_k its kept local context) with
cross-entropy only, one text-encoder call per step on ``[G_k ; L_k]``; it
uploads G_k and keeps L_k. The server sets G to the FedAvg of the uploaded
G_k (weighted by training-set size, clients in sorted id order). A client is
scored with the NEW global G and its own L_k; a client that never trained
uses the initial local context.

Choices
-------
* Initial local context: its own seeded draw, the second N(0, 0.02^2) draw of
  the experiment's "init" stream after G's (with ``--ctx-init`` both are the
  phrase's embeddings). Every client starts from this same L_0, which any
  party rebuilds from the seed (:meth:`FederatedMethod.initial_state`); it is
  kept in the server state only for that reason, never updated, and never
  sent (downloads carry G alone).
* Aggregation: the authors' code indexes a compacted list of the round's
  clients by client id; we do not reproduce that and take the plain
  sample-weighted FedAvg of G (PROTOCOL-MORE.md).
* Both contexts are optimised in every step with the same SGD settings
  (fresh per round, cosine over the local epochs). At theta = 0 (or 1) the
  unused context gets zero gradient but still weight decay, which changes no
  logit.

Options
-------
theta:
    Weight of the local prompt's features in [0, 1] (default 0.4, the
    authors' code; FLiP uses 0.2).

State: server ``{"ctx", "local_init"}`` (G and the public initial L_0);
client ``{"local_ctx"}`` (L_k). Down: ``{"ctx"}``; up: ``{"ctx"}`` (G_k);
evaluation download: ``{"ctx"}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from pfedmoap_cli.engine.batched_round import run_local_epochs_batched
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.base import (
    ClientEvaluator,
    ClientJob,
    ClientResult,
    FederatedMethod,
    RoundView,
    State,
    register_method,
)
from pfedmoap_cli.methods.local_training import cross_entropy, prompt_logits, run_local_epochs, weighted_average


@dataclass(frozen=True)
class PromptFolioOptions:
    theta: float = 0.4

    def __post_init__(self) -> None:
        theta = self.theta
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or not 0.0 <= theta <= 1.0:
            raise ConfigError(f"promptfolio option theta must be a number in [0, 1], got {theta!r}; pass --method-option theta=0.4")
        object.__setattr__(self, "theta", float(theta))


def mixed_text(global_text: torch.Tensor, local_text: torch.Tensor, theta: float) -> torch.Tensor:
    """``(1 - theta) t(G) + theta t(L)``, not re-normalised."""
    return (1.0 - theta) * global_text + theta * local_text


class PortfolioEvaluator(ClientEvaluator):
    """Scores a client with the new global prompt mixed with its own local prompt (or the initial one)."""

    def __init__(self, method: "PromptFolio", global_ctx: torch.Tensor, local_ctxs: dict[int, torch.Tensor]) -> None:
        self.method = method
        self.local_ctxs = local_ctxs
        env = method.env
        with torch.no_grad():
            self.global_text = env.text_encoder(global_ctx.to(env.device))
        self._mixed: dict[int | None, torch.Tensor] = {}  # client id (None: the initial L) -> mixed class features

    def _text(self, client_id: int) -> torch.Tensor:
        key = client_id if client_id in self.local_ctxs else None
        if key not in self._mixed:
            env = self.method.env
            local = self.local_ctxs[key] if key is not None else self.method.initial_local()
            with torch.no_grad():
                self._mixed[key] = mixed_text(self.global_text, env.text_encoder(local.to(env.device)), self.method.options.theta)
        return self._mixed[key]

    def logits(self, client_id: int, image_features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return prompt_logits(image_features, self._text(client_id), self.method.env.logit_scale)


@register_method
class PromptFolio(FederatedMethod):
    name = "promptfolio"
    global_part = "the global prompt, mixed with the initial local prompt a new client starts from"
    Options = PromptFolioOptions

    def __init__(self, env, options=None) -> None:
        super().__init__(env, options or PromptFolioOptions())
        self._initial_local: torch.Tensor | None = None

    # ---- server ---------------------------------------------------------
    def initial_server_state(self, generator: torch.Generator) -> State:
        global_ctx = self.env.text_encoder.initial_context(generator)
        local_ctx = self.env.text_encoder.initial_context(generator)  # the next draw of the same stream
        return {"ctx": global_ctx, "local_init": local_ctx}

    def initial_local(self) -> torch.Tensor:
        """L_0: every client's local context before its first update (rebuilt from the seed, cached)."""
        if self._initial_local is None:
            self._initial_local = self.initial_state()["local_init"]
        return self._initial_local

    def client_download(self, server_state: Mapping[str, torch.Tensor], client_id: int, round_index: int) -> State:
        """G alone: a client starts its local context from :meth:`initial_local` itself."""
        return {"ctx": server_state["ctx"]}

    def aggregate(self, start_state: Mapping[str, torch.Tensor], results: Mapping[int, ClientResult], round_index: int) -> State:
        if not results:
            return dict(start_state)
        order = sorted(results)  # a fixed order keeps the float sum independent of scheduling
        ctx = weighted_average([results[c].upload["ctx"] for c in order], [results[c].num_examples for c in order])
        return {"ctx": ctx, "local_init": start_state["local_init"]}

    # ---- client ---------------------------------------------------------
    def start_local(self, job: ClientJob) -> torch.Tensor:
        return job.client_state["local_ctx"] if job.client_state else self.initial_local()

    def _loss(self, features: torch.Tensor, labels: torch.Tensor, text_global: torch.Tensor, text_local: torch.Tensor) -> torch.Tensor:
        mixed = mixed_text(text_global, text_local, self.options.theta)
        return cross_entropy(prompt_logits(features, mixed, self.env.logit_scale), labels)

    def train_client(self, job: ClientJob) -> ClientResult:
        env = self.env
        global_ctx = torch.nn.Parameter(job.server_state["ctx"].detach().clone().to(env.device, torch.float32))
        local_ctx = torch.nn.Parameter(self.start_local(job).detach().clone().to(env.device, torch.float32))

        def loss_fn(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            text = env.text_encoder(torch.stack([global_ctx, local_ctx]))  # (2, C, D): one encoder call
            return self._loss(features, labels, text[0], text[1])

        groups = [{"params": [global_ctx, local_ctx], "lr": env.training.lr, "cosine": True}]
        loss = run_local_epochs(job.batches, groups, loss_fn, env.training, env.clip.encode_images)
        return ClientResult(
            upload={"ctx": global_ctx.detach()}, client_state={"local_ctx": local_ctx.detach()}, num_examples=job.num_examples, train_loss=loss
        )

    def train_clients_batched(self, jobs: Sequence[ClientJob]) -> list[ClientResult]:
        """Every participant's (G_k, L_k) trained in lock step: one encoder call on all active rows per step."""
        env = self.env
        global_ctx = torch.nn.Parameter(torch.stack([job.server_state["ctx"].detach().to(env.device, torch.float32) for job in jobs]))
        local_ctx = torch.nn.Parameter(torch.stack([self.start_local(job).detach().to(env.device, torch.float32) for job in jobs]))

        def loss_fn(positions: list[int], features: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
            index = torch.tensor(positions, device=global_ctx.device)
            text = env.text_encoder(torch.cat([global_ctx.index_select(0, index), local_ctx.index_select(0, index)]))
            n = len(positions)
            return torch.stack([self._loss(feats, y, text[row], text[n + row]) for row, (feats, y) in enumerate(zip(features, labels))])

        groups = [{"params": [global_ctx, local_ctx], "lr": env.training.lr, "cosine": True}]
        losses = run_local_epochs_batched(jobs, groups, loss_fn, env.training, env.clip.encode_images)
        return [
            ClientResult(upload={"ctx": g.clone()}, client_state={"local_ctx": l.clone()}, num_examples=job.num_examples, train_loss=loss)
            for job, g, l, loss in zip(jobs, global_ctx.detach(), local_ctx.detach(), losses)
        ]

    # ---- evaluation -----------------------------------------------------
    def evaluator(self, view: RoundView) -> ClientEvaluator:
        local = {cid: state["local_ctx"] for cid, state in view.client_states.items() if "local_ctx" in state}
        return PortfolioEvaluator(self, view.end_state["ctx"], local)

    def evaluation_download(self, view: RoundView, client_id: int) -> State:
        """The new global G alone (a client's L_k, or L_0, is on the client)."""
        return {"ctx": view.end_state["ctx"]}
