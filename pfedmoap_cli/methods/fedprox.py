"""Prompt+FedProx: PromptFL with a proximal term towards the round's global prompt.

Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020),
applied to the CoOp prompt (PROTOCOL.md section 6). Each participant
minimises

    CE(s * I T(ctx)^T, y) + (mu / 2) * ||ctx - ctx_global||_F^2

starting from ``ctx = ctx_global``; the server averages the uploads by
training-set size (FedAvg) and every client is scored with the global prompt,
as in PromptFL.

The proximal term is differentiable in ``ctx`` (its gradient is
``mu * (ctx - ctx_global)``) -- unlike the reference code, which computes it on
detached tensors so that it adds nothing to the gradient (PROTOCOL.md
section 7, defect 7). ``ctx_global`` is a constant of the client's update.

Options
-------
mu:
    Proximal coefficient (default 0.5, the reference code's ``--mu``).

State: server ``{"ctx"}``; clients keep nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.base import ClientJob, ClientResult, register_method
from pfedmoap_cli.methods.coop import train_prompt, train_prompts_batched
from pfedmoap_cli.methods.promptfl import PromptFL


@dataclass(frozen=True)
class FedProxOptions:
    mu: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.mu, bool) or not isinstance(self.mu, (int, float)) or self.mu < 0:
            raise ConfigError(f"fedprox option mu must be a non-negative number, got {self.mu!r}")
        object.__setattr__(self, "mu", float(self.mu))


def proximal_term(anchor: torch.Tensor, mu: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``ctx -> (mu / 2) * ||ctx - anchor||^2``, differentiable in ``ctx``; ``anchor`` is a constant."""
    anchor = anchor.detach().clone()

    def term(ctx: torch.Tensor) -> torch.Tensor:
        return 0.5 * mu * (ctx - anchor.to(ctx.device, ctx.dtype)).pow(2).sum()

    return term


@register_method
class FedProx(PromptFL):
    name = "fedprox"
    Options = FedProxOptions

    def __init__(self, env, options=None) -> None:
        super().__init__(env, options or FedProxOptions())

    # ---- client ---------------------------------------------------------
    def train_client(self, job: ClientJob) -> ClientResult:
        global_ctx = job.server_state["ctx"]
        ctx, loss = train_prompt(self, job, global_ctx, extra_loss=proximal_term(global_ctx, self.options.mu))
        return ClientResult(upload={"ctx": ctx}, client_state={}, num_examples=job.num_examples, train_loss=loss)

    def train_clients_batched(self, jobs: Sequence[ClientJob]) -> list[ClientResult]:
        """Lock-step local updates, each with the proximal term towards its own download."""
        anchors = [job.server_state["ctx"] for job in jobs]
        extra = [proximal_term(anchor, self.options.mu) for anchor in anchors]
        ctxs, losses = train_prompts_batched(self, jobs, anchors, extra_losses=extra)
        return [
            ClientResult(upload={"ctx": ctx}, client_state={}, num_examples=job.num_examples, train_loss=loss)
            for job, ctx, loss in zip(jobs, ctxs, losses)
        ]

    # ---- server and evaluation: PromptFL's FedAvg and global prompt (inherited) ----
