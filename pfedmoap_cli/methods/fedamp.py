"""Prompt+FedAMP: personalised prompts pulled towards an attention-weighted mix of similar clients.

Huang et al., "Personalized Cross-Silo Federated Learning on Non-IID Data"
(AAAI 2021), in its heuristic form for deep models (HeurFedAMP: cosine
similarity and a fixed self-attention weight), applied to the CoOp prompt
(PROTOCOL.md section 6).

Every client owns a personal prompt ``ctx_i``. The server keeps the latest
uploaded prompt of every client (the pool) and sends participant i the
personalised aggregate

    u_i = xi_ii * ctx_i + sum_{j != i} xi_ij * ctx_j,
    xi_ij = (1 - xi_ii) * exp(sigma * cos(ctx_i, ctx_j)) / sum_{h != i} exp(sigma * cos(ctx_i, ctx_h)),

over the clients j in the round-start pool (so the weights sum to 1; with no
other client in the pool, ``u_i = ctx_i``). ``cos`` is the cosine similarity
of the flattened prompts. The client then trains its own prompt (from
``ctx_i``; a client that has not trained starts from the initial prompt) on

    CE(s * I T(ctx)^T, y) + (lambda / 2) * ||ctx - u_i||_F^2,

with ``u_i`` a constant, and uploads the result, which becomes both its
personal prompt and its pool entry. Every client is scored with its own
prompt (the initial one if it has not trained yet).

Options (the paper leaves them open for prompts; documented choices)
-------------------------------------------------------------------
sigma:
    Attention sharpness (default 10). Prompts that start from the same
    initialisation stay close (cosine similarities near 1), so a small sigma
    would make the attention almost uniform.
self_weight:
    xi_ii in [0, 1) (default 0.5): the share of the client's own prompt in u_i.
lam:
    Coefficient of the proximal term (default 1.0).

State: server ``{"ctx_init", "pool" (N, n_ctx, W), "in_pool" (N,) bool}``;
client ``{"ctx"}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

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
from pfedmoap_cli.methods.coop import PerClientPromptEvaluator, train_prompt
from pfedmoap_cli.methods.fedprox import proximal_term


def _number(method: str, name: str, value, low: float, high: float | None = None, high_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bound = f"in [{low}, {high})" if high is not None and high_open else (f"in [{low}, {high}]" if high is not None else f">= {low}")
        raise ConfigError(f"{method} option {name} must be a number {bound}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class FedAMPOptions:
    sigma: float = 10.0
    self_weight: float = 0.5
    lam: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", _number("fedamp", "sigma", self.sigma, 0.0))
        object.__setattr__(self, "self_weight", _number("fedamp", "self_weight", self.self_weight, 0.0, 1.0, high_open=True))
        object.__setattr__(self, "lam", _number("fedamp", "lam", self.lam, 0.0))


# ---- server half -----------------------------------------------------------------------
def attention_weights(own: torch.Tensor, others: torch.Tensor, sigma: float, self_weight: float) -> torch.Tensor:
    """FedAMP's weights ``[xi_ii, xi_i1, ..., xi_iK]`` for one client; they sum to 1.

    Parameters
    ----------
    own:
        The client's prompt (any shape).
    others:
        ``(K, *own.shape)``, the other clients' pool prompts (K may be 0).
    sigma, self_weight:
        Attention sharpness and xi_ii.

    Returns
    -------
    Tensor
        float64 ``(1 + K,)``: entry 0 is the self weight, entry 1 + k the weight of ``others[k]``.
    """
    if others.shape[0] == 0:
        return torch.ones(1, dtype=torch.float64, device=own.device)
    cos = F.cosine_similarity(own.reshape(1, -1).double(), others.reshape(others.shape[0], -1).double().to(own.device), dim=1)
    share = torch.softmax(sigma * cos, dim=0) * (1.0 - self_weight)
    return torch.cat([torch.tensor([self_weight], dtype=torch.float64, device=own.device), share])


def personalised_aggregate(own: torch.Tensor, others: torch.Tensor, sigma: float, self_weight: float) -> torch.Tensor:
    """``u_i = xi_ii * own + sum_k xi_ik * others[k]`` in ``own``'s dtype."""
    weights = attention_weights(own, others, sigma, self_weight)
    stacked = torch.cat([own.unsqueeze(0), others.to(own.device)], dim=0).double()
    return torch.einsum("k,k...->...", weights, stacked).to(own.dtype)


@register_method
class FedAMP(FederatedMethod):
    name = "fedamp"
    global_part = None
    no_global_part_reason = "the server keeps one personalised aggregate per client and no global prompt"
    Options = FedAMPOptions

    def __init__(self, env, options=None) -> None:
        super().__init__(env, options or FedAMPOptions())

    def initial_server_state(self, generator: torch.Generator) -> State:
        ctx = self.env.text_encoder.initial_context(generator)
        pool = torch.zeros((self.env.num_clients, *ctx.shape), dtype=ctx.dtype, device=ctx.device)
        in_pool = torch.zeros(self.env.num_clients, dtype=torch.bool, device=ctx.device)
        return {"ctx_init": ctx, "pool": pool, "in_pool": in_pool}

    def message(self, server_state: Mapping[str, torch.Tensor], client_id: int) -> torch.Tensor:
        """What the server sends client ``client_id``: its personalised aggregate ``u_i`` (from the round-start pool).

        The client's own prompt is its last upload (the pool keeps it exactly),
        or the initial prompt before its first one.
        """
        own = server_state["pool"][client_id] if bool(server_state["in_pool"][client_id]) else server_state["ctx_init"]
        in_pool = server_state["in_pool"].clone()
        in_pool[client_id] = False
        others = server_state["pool"][in_pool]
        return personalised_aggregate(own, others, self.options.sigma, self.options.self_weight)

    def aggregate(self, start_state: Mapping[str, torch.Tensor], results: Mapping[int, ClientResult], round_index: int) -> State:
        pool, in_pool = start_state["pool"].clone(), start_state["in_pool"].clone()
        for client_id in sorted(results):
            pool[client_id] = results[client_id].upload["ctx"].to(pool.device, pool.dtype)
            in_pool[client_id] = True
        return {"ctx_init": start_state["ctx_init"], "pool": pool, "in_pool": in_pool}

    def client_download(self, server_state: Mapping[str, torch.Tensor], client_id: int, round_index: int) -> State:
        """Only the client's own ``u_i``; the pool of everyone's prompts stays on the server."""
        return {"u": self.message(server_state, client_id)}

    # ---- client half ----------------------------------------------------
    def train_client(self, job: ClientJob) -> ClientResult:
        own = job.client_state["ctx"] if job.client_state else self.initial_state()["ctx_init"]
        target = job.server_state["u"]
        ctx, loss = train_prompt(self, job, own, extra_loss=proximal_term(target, self.options.lam))
        return ClientResult(upload={"ctx": ctx}, client_state={"ctx": ctx.clone()}, num_examples=job.num_examples, train_loss=loss)

    # ---- evaluation -----------------------------------------------------
    def evaluation_download(self, view: RoundView, client_id: int) -> State:
        """The initial prompt only (for clients that never trained); the pool stays on the server."""
        return {"ctx_init": view.end_state["ctx_init"]}

    def evaluator(self, view: RoundView) -> ClientEvaluator:
        prompts = {cid: state["ctx"] for cid, state in view.client_states.items() if "ctx" in state}
        return PerClientPromptEvaluator(self.env.text_encoder, self.env.logit_scale, prompts, view.end_state["ctx_init"])
