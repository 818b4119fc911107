"""Entropic unbalanced optimal transport, batched, without gradient (FedOTP's solver).

For each problem (one image and one class in FedOTP) with cost ``C`` (M x N),
token masses ``a`` (M) and prompt masses ``b`` (N, summing to at most
``sum(a)``), it solves

    min_T  <T, C> - eps * H(T)   s.t.   T 1_N <= a,   T^T 1_M = b,   T >= 0,

i.e. every prompt receives exactly its mass while every token may send at
most its own: only the best-matching fraction ``sum(b) / sum(a)`` of the image
is transported (FedOTP's "top_percent"). This is the constrained problem that
FedOTP's ``entropic_COT_fast`` iterates on; its fixed point satisfies
``T = diag(u) K diag(v)`` with ``K = exp(-C / eps)``,
``u = min(1, a / (K v))`` and ``v = b / (K^T u)`` (Chizat, Peyre,
Schmitzer and Vialard, "Scaling algorithms for unbalanced optimal transport
problems", Math. Comp. 2018: the proximal step of the constraint
``T 1 <= a`` is ``min(1, a / (K v))``).

Differences from the reference code, on purpose:

* the iterations run in the log domain, so ``exp(-C / eps)`` never underflows
  (with eps = 0.01 and costs near 1, K is about e^-100, below float32's range);
* the stopping test is scale-free: the L1 distance, in transported mass,
  between the current token marginal ``T 1`` and the one the next token step
  would give (``min(K v, a)``), maximised over the batch. The reference
  compares successive ``v``, whose scale grows like ``exp(cost / eps)``, so its
  threshold has no fixed meaning. At exit every prompt marginal is exact and
  every token marginal is within ``threshold`` (L1, per problem) of feasible,
  unless the iteration cap was reached first.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TransportPlan(NamedTuple):
    """A solved batch: the plans, the iterations run, and the final stopping error."""

    plan: torch.Tensor
    iterations: int
    error: float


@torch.no_grad()
def unbalanced_sinkhorn(
    cost: torch.Tensor,
    token_mass: torch.Tensor,
    prompt_mass: torch.Tensor,
    eps: float,
    threshold: float = 1e-3,
    max_iter: int = 100,
) -> TransportPlan:
    """Entropic OT plans with an upper-bounded token marginal, for a batch of problems.

    Parameters
    ----------
    cost:
        ``(..., M, N)`` costs (FedOTP: ``1 - cos(local token, prompt class feature)``).
    token_mass:
        Upper bounds ``a`` of the token marginals, broadcastable to ``(..., M)``.
    prompt_mass:
        Exact prompt marginals ``b``, broadcastable to ``(..., N)``; ``sum(b) <= sum(a)``.
    eps:
        Entropic regularisation (> 0).
    threshold:
        Stop once the token-marginal residual (see the module docstring) of every
        problem is below it.
    max_iter:
        At most this many iterations.

    Returns
    -------
    TransportPlan
        ``plan`` with the shape and dtype of ``cost`` (no gradient), the number of
        iterations run and the last residual.
    """
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    work = torch.float64 if cost.dtype == torch.float64 else torch.float32
    log_k = -cost.detach().to(work) / eps  # (..., M, N)
    shape_m, shape_n = log_k.shape[:-1], log_k.shape[:-2] + log_k.shape[-1:]
    log_a = torch.log(torch.as_tensor(token_mass, dtype=work, device=cost.device)).expand(shape_m)
    log_b = torch.log(torch.as_tensor(prompt_mass, dtype=work, device=cost.device)).expand(shape_n)
    log_v = torch.zeros(shape_n, dtype=work, device=cost.device)
    log_kv = torch.logsumexp(log_k + log_v.unsqueeze(-2), dim=-1)  # log (K v), (..., M)
    log_u = torch.zeros_like(log_kv)
    error, iterations = float("inf"), 0
    for iterations in range(1, max_iter + 1):
        log_u = torch.clamp(log_a - log_kv, max=0.0)  # u = min(1, a / (K v))
        log_v = log_b - torch.logsumexp(log_k + log_u.unsqueeze(-1), dim=-2)  # v = b / (K^T u)
        log_kv = torch.logsumexp(log_k + log_v.unsqueeze(-2), dim=-1)
        rows = torch.exp(log_u + log_kv)  # T 1 now
        target = torch.exp(torch.minimum(log_kv, log_a))  # T 1 after the next token step
        residual = (rows - target).abs().sum(dim=-1)
        error = float(residual.max()) if residual.numel() else 0.0
        if error < threshold:
            break
    plan = torch.exp(log_u.unsqueeze(-1) + log_k + log_v.unsqueeze(-2))
    return TransportPlan(plan.to(cost.dtype), iterations, error)
