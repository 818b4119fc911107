"""Prompt+FedPer: the first context tokens are federated, the rest stay personal.

Arivazhagan et al., "Federated Learning with Personalization Layers" (arXiv
1912.00818, 2019), applied to the CoOp context (PROTOCOL.md section 6): of the
``n_ctx`` context vectors, the first ``shared_tokens`` (default: the first
half, ``n_ctx // 2``) form the shared part, averaged by training-set size
(FedAvg); the remaining ones are each client's personal part, which never
leaves the client.

A participant's context is ``[shared_global ; personal_i]``; it trains the
whole context for the round's local epochs and uploads only the shared part.
A client that has not trained yet uses the initial personal part, which comes
from the same initial context as the shared one (it is part of the server's
state only so that it is reproducible; it is never updated or averaged).
Every client is scored with ``[shared_global ; its personal part]``.

Options
-------
shared_tokens:
    Number of leading context vectors that are shared (default ``n_ctx // 2``);
    must leave at least one shared and one personal vector.

State: server ``{"ctx_shared", "personal_init"}``; client ``{"personal"}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

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
from pfedmoap_cli.methods.coop import PerClientPromptEvaluator, train_prompt, train_prompts_batched
from pfedmoap_cli.methods.local_training import weighted_average


@dataclass(frozen=True)
class FedPerOptions:
    shared_tokens: int | None = None

    def __post_init__(self) -> None:
        value = self.shared_tokens
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"fedper option shared_tokens must be a positive integer, got {value!r}")


@register_method
class FedPer(FederatedMethod):
    name = "fedper"
    global_part = "the shared context tokens, with the initial personal tokens a new client starts from"
    Options = FedPerOptions

    def __init__(self, env, options=None) -> None:
        super().__init__(env, options or FedPerOptions())
        n_ctx = env.text_encoder.n_ctx
        shared = self.options.shared_tokens if self.options.shared_tokens is not None else n_ctx // 2
        if not 1 <= shared < n_ctx:
            raise ConfigError(
                f"fedper splits the context into a shared and a personal part, so it needs 1 <= shared_tokens < n_ctx "
                f"(got shared_tokens={shared}, n_ctx={n_ctx}); use --n-ctx 2 or more, or set --method-option shared_tokens=K"
            )
        self.shared = shared

    # ---- server ---------------------------------------------------------
    def initial_server_state(self, generator: torch.Generator) -> State:
        ctx = self.env.text_encoder.initial_context(generator)
        return {"ctx_shared": ctx[: self.shared].clone(), "personal_init": ctx[self.shared :].clone()}

    def aggregate(self, start_state: Mapping[str, torch.Tensor], results: Mapping[int, ClientResult], round_index: int) -> State:
        if not results:
            return dict(start_state)
        order = sorted(results)  # fixed order: the float sum does not depend on scheduling
        shared = weighted_average([results[c].upload["ctx_shared"] for c in order], [results[c].num_examples for c in order])
        return {"ctx_shared": shared, "personal_init": start_state["personal_init"]}

    def client_download(self, server_state: Mapping[str, torch.Tensor], client_id: int, round_index: int) -> State:
        """Only the shared half: a client starts its personal half from :meth:`initial_state` itself."""
        return {"ctx_shared": server_state["ctx_shared"]}

    # ---- client ---------------------------------------------------------
    def full_context(self, shared: torch.Tensor, personal: torch.Tensor) -> torch.Tensor:
        """The client's whole context ``[shared ; personal]`` (n_ctx, W)."""
        return torch.cat([shared.to(personal.device), personal], dim=0)

    def start_context(self, job: ClientJob, initial_personal: torch.Tensor | None = None) -> torch.Tensor:
        """The context a participant starts from: the downloaded shared part and its own personal part."""
        shared = job.server_state["ctx_shared"]
        if job.client_state:
            personal = job.client_state["personal"]
        else:
            personal = initial_personal if initial_personal is not None else self.initial_state()["personal_init"]
        return self.full_context(shared, personal)

    def result(self, job: ClientJob, ctx: torch.Tensor, loss: float) -> ClientResult:
        """Upload the shared part of a trained context; keep the personal part."""
        return ClientResult(
            upload={"ctx_shared": ctx[: self.shared].clone()},
            client_state={"personal": ctx[self.shared :].clone()},
            num_examples=job.num_examples,
            train_loss=loss,
        )

    def train_client(self, job: ClientJob) -> ClientResult:
        ctx, loss = train_prompt(self, job, self.start_context(job))
        return self.result(job, ctx, loss)

    def train_clients_batched(self, jobs: Sequence[ClientJob]) -> list[ClientResult]:
        """Every participant's ``[shared ; personal]`` context trained in lock step, split per client."""
        initial = self.initial_state()["personal_init"] if any(not job.client_state for job in jobs) else None
        ctxs, losses = train_prompts_batched(self, jobs, [self.start_context(job, initial) for job in jobs])
        return [self.result(job, ctx, loss) for job, ctx, loss in zip(jobs, ctxs, losses)]

    # ---- evaluation -----------------------------------------------------
    def evaluator(self, view: RoundView) -> ClientEvaluator:
        shared = view.end_state["ctx_shared"]
        prompts = {
            cid: self.full_context(shared, state["personal"]) for cid, state in view.client_states.items() if "personal" in state
        }
        fallback = self.full_context(shared, view.end_state["personal_init"])
        return PerClientPromptEvaluator(self.env.text_encoder, self.env.logit_scale, prompts, fallback)
