"""FedOTP's transport solver against the authors' loop (issue 17).

The reference is written out here as the authors' ``entropic_COT_fast``
(FedOTP, ``trainers/GLP_OT.py``) iterates, in the exponential domain and in
float64: start from ``u = v = 1``; each iteration keeps ``v_prev = v``, sets
``u = min(a / (K v), 1)``, then ``v = b / (K^T u)``, then
``err = mean |v - v_prev|`` over the whole batch, and stops once
``err < threshold``; the plan is ``diag(u) K diag(v)``. It shares no code with
:mod:`pfedmoap_cli.methods.ot` (log domain, log-sum-exp error).
"""

from __future__ import annotations

import math

import pytest
import torch

from pfedmoap_cli.engine.session import method_options
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.fedotp import FedOTP, FedOTPOptions, ot_logits
from pfedmoap_cli.methods.ot import mean_abs_change, unbalanced_sinkhorn

M, N, TOP = 16, 2, 0.8


def masses(dtype=torch.float32):
    return torch.full((M,), 1 / M, dtype=dtype), torch.full((N,), TOP / N, dtype=dtype)


def cost_batch(seed: int, low: float, width: float, shape=(3, 4)) -> torch.Tensor:
    """``(B, C, M, N)`` float32 costs ``1 - sim`` with ``sim`` uniform in ``[low, low + width)``."""
    g = torch.Generator().manual_seed(seed)
    return 1.0 - (torch.rand(*shape, M, N, generator=g) * width + low)


def authors_loop(cost, a, b, eps, threshold, max_iter, dtype=torch.float64, error="authors"):
    """The authors' iterations in the exponential domain; ``error="marginal"`` swaps in today's residual."""
    k = torch.exp(-cost.to(dtype) / eps)
    a = a.to(dtype).expand(cost.shape[:-1])
    b = b.to(dtype).expand(cost.shape[:-2] + cost.shape[-1:])
    u, v = torch.ones_like(a), torch.ones_like(b)
    for iteration in range(1, max_iter + 1):
        v_prev = v
        u = torch.minimum(a / (k @ v.unsqueeze(-1)).squeeze(-1), torch.ones_like(a))
        v = b / (k.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1)
        if error == "authors":
            err = float((v - v_prev).abs().mean())
        else:  # L1 gap between T 1 and min(K v, a), the worst problem
            kv = (k @ v.unsqueeze(-1)).squeeze(-1)
            err = float((u * kv - torch.minimum(kv, a)).abs().sum(-1).max())
        if err < threshold:
            break
    return u.unsqueeze(-1) * k * v.unsqueeze(-2), iteration, err


def max_relative(plan: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((plan.double() - expected) / expected).abs().max())


# ---- the stopping rule --------------------------------------------------------------------
def test_authors_rule_stops_where_the_authors_loop_stops():
    """At eps 0.1 the two rules stop at different iterations; the default stops where the authors' loop does."""
    cost = cost_batch(0, 0.05, 0.3)
    a, b = masses()
    expected, expected_iterations, expected_error = authors_loop(cost, a, b, 0.1, 1e-3, 100)
    authors = unbalanced_sinkhorn(cost, a, b, 0.1)  # default rule, threshold 1e-3, 100 iterations
    marginal = unbalanced_sinkhorn(cost, a, b, 0.1, stop_rule="marginal")
    assert (authors.iterations, marginal.iterations) == (expected_iterations, 15) == (26, 15)
    assert authors.error == pytest.approx(expected_error, rel=1e-9)
    assert authors.plan.dtype == torch.float32
    assert max_relative(authors.plan, expected) < 1.2e-7  # float32 rounding of the float64 plan
    assert max_relative(marginal.plan, expected) > 1e-5  # eleven iterations short: a different plan
    exact = unbalanced_sinkhorn(cost.double(), a, b, 0.1)
    assert exact.iterations == 26 and max_relative(exact.plan, expected) < 1e-12


def test_authors_loop_starts_from_v_one():
    """Similar tokens and prompts (K v > a at v = 1, so the first token step binds): the start shows in the count."""
    cost = cost_batch(5, 0.7, 0.3)
    a, b = masses()
    expected, expected_iterations, _ = authors_loop(cost, a, b, 0.1, 1e-3, 100)
    result = unbalanced_sinkhorn(cost, a, b, 0.1)
    assert result.iterations == expected_iterations == 18  # 22 when started from v = e
    assert max_relative(result.plan, expected) < 1.2e-7


def test_authors_error_is_the_mean_over_the_whole_batch():
    """One problem alone stops elsewhere than inside the batch: the error pools every problem and prompt."""
    cost = cost_batch(0, 0.05, 0.3)
    a, b = masses()
    alone = [unbalanced_sinkhorn(cost[i, j], a, b, 0.1).iterations for i in range(3) for j in range(4)]
    expected = [authors_loop(cost[i, j], a, b, 0.1, 1e-3, 100)[1] for i in range(3) for j in range(4)]
    assert alone == expected and len(set(alone)) > 1 and 26 not in alone


def test_authors_rule_runs_to_the_cap_at_eps_001():
    """At eps 0.01 the authors' error is astronomically large (v scales like exp(cost / eps)): always max_iter."""
    cost = cost_batch(1, 0.05, 0.3)
    a, b = masses()
    expected, expected_iterations, expected_error = authors_loop(cost, a, b, 0.01, 1e-3, 100)
    result = unbalanced_sinkhorn(cost, a, b, 0.01)
    assert result.iterations == expected_iterations == 100
    assert expected_error > 1e20 and result.error == pytest.approx(expected_error, rel=1e-9)
    assert max_relative(result.plan, expected) < 1.2e-7


def test_mean_abs_change_is_exact_and_never_overflows():
    x = torch.tensor([[0.0, 3.0], [700.0, -5.0]], dtype=torch.float64)
    y = torch.tensor([[0.5, 3.0], [699.0, -5.5]], dtype=torch.float64)
    direct = float((x.exp() - y.exp()).abs().mean())  # e^700 is still finite in float64
    assert mean_abs_change(x, y) == pytest.approx(direct, rel=1e-12)
    assert mean_abs_change(x, x) == 0.0
    far = torch.tensor([800.0, 1.0], dtype=torch.float64)  # e^800 overflows float64: the error is inf, not NaN
    assert mean_abs_change(far, far - 1.0) == math.inf
    assert mean_abs_change(x.float(), y.float()) == pytest.approx(direct, rel=1e-6)


def test_an_overflowing_authors_error_never_meets_the_threshold():
    """eps 0.001: log v reaches several hundred, |v - v_prev| exceeds float64; the loop runs to the cap, finite plan."""
    cost = cost_batch(2, 0.05, 0.3, shape=(2, 2))
    a, b = masses()
    result = unbalanced_sinkhorn(cost, a, b, 0.001, max_iter=30)
    assert result.iterations == 30 and result.error == math.inf
    assert torch.isfinite(result.plan).all()
    assert torch.allclose(result.plan.sum(dim=-2), b.expand(2, 2, N), atol=1e-6)


# ---- the plan in float64 ------------------------------------------------------------------
def test_plan_is_formed_in_float64_with_log_terms_near_70():
    """eps 0.01 and costs near 0.7: log K, log u and log v near +-70, whose float32 rounding costs 1e-5 relative."""
    cost = 0.7 + 0.05 * torch.rand(2, 3, M, N, generator=torch.Generator().manual_seed(3))
    a, b = masses()
    expected, _, _ = authors_loop(cost, a, b, 0.01, 0.0, 100)  # threshold 0: exactly 100 iterations
    k = torch.exp(-cost.double() / 0.01)
    log_v_floor = torch.log(expected.sum(dim=-2) / k.sum(dim=-2))  # sum_m T = v sum_m u K with u <= 1: below log v
    assert float(cost.min()) / 0.01 > 69 and float(log_v_floor.min()) > 60
    single = unbalanced_sinkhorn(cost, a, b, 0.01, threshold=0.0)
    assert single.iterations == 100 and single.plan.dtype == torch.float32
    assert max_relative(single.plan, expected) < 1.2e-7  # the float32 solver before issue 17: 2.3e-5
    double = unbalanced_sinkhorn(cost.double(), a.double(), b.double(), 0.01, threshold=0.0)
    assert max_relative(double.plan, expected) < 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_plan_stays_finite_where_the_authors_kernel_underflows(dtype):
    """Random features at eps 0.01: in float32 the authors' loop returns NaN; ours is finite, prompt masses exact."""
    g = torch.Generator().manual_seed(4)
    tokens = torch.nn.functional.normalize(torch.randn(4, M, 32, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(N, 5, 32, generator=g), dim=-1)
    cost = (1.0 - torch.einsum("bmd,ncd->bcmn", tokens, text)).to(dtype)
    a, b = masses()
    reference, _, _ = authors_loop(cost, a, b, 0.01, 1e-3, 100, dtype=torch.float32)
    assert torch.isnan(reference).any()  # what the authors' code hits (then returns None)
    result = unbalanced_sinkhorn(cost, a, b, 0.01)
    assert result.plan.dtype == dtype and torch.isfinite(result.plan).all()
    plan = result.plan.double()
    tolerance = 1e-6 if dtype == torch.float32 else 2e-3
    assert (plan >= 0).all()  # every prompt gets its mass after each iteration (tokens only at convergence)
    assert torch.allclose(plan.sum(dim=-2), torch.full((4, 5, N), TOP / N, dtype=torch.float64), atol=tolerance)


# ---- the marginal rule keeps today's behaviour ------------------------------------------------
@pytest.mark.parametrize(("eps", "iterations"), [(0.1, 15), (0.05, 40)])
def test_marginal_rule_keeps_todays_stopping(eps, iterations):
    """``stop_rule=marginal`` stops where the solver before issue 17 stopped (15 and 40, measured) and where the
    written-out loop with the marginal residual stops; every token marginal is within the threshold of feasible."""
    cost = cost_batch(0, 0.05, 0.3)
    a, b = masses()
    expected, expected_iterations, _ = authors_loop(cost, a, b, eps, 1e-3, 100, error="marginal")
    result = unbalanced_sinkhorn(cost.double(), a, b, eps, stop_rule="marginal")
    assert result.iterations == expected_iterations == iterations and result.error < 1e-3
    assert max_relative(result.plan, expected) < 1e-12
    excess = (result.plan.sum(dim=-1) - 1 / M).clamp(min=0).sum(dim=-1)
    assert float(excess.max()) < 1e-3
    assert torch.allclose(result.plan.sum(dim=-2), b.double().expand(3, 4, N), atol=1e-12)


# ---- the option ---------------------------------------------------------------------------
def test_stop_rule_option_defaults_to_the_authors_and_is_validated():
    assert FedOTPOptions().stop_rule == "authors"
    assert method_options(FedOTP, {"stop_rule": "marginal"}).stop_rule == "marginal"
    with pytest.raises(ConfigError, match="--method-option stop_rule=authors") as caught:
        FedOTPOptions(stop_rule="max")
    assert "\n" not in str(caught.value) and "authors, marginal" in str(caught.value)
    with pytest.raises(ValueError, match="stop_rule"):
        unbalanced_sinkhorn(cost_batch(0, 0.05, 0.3), *masses(), 0.1, stop_rule="max")


def test_ot_logits_use_the_chosen_rule():
    g = torch.Generator().manual_seed(6)
    tokens = torch.nn.functional.normalize(torch.randn(3, M, 32, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(N, 4, 32, generator=g), dim=-1)
    cost = 1.0 - torch.einsum("bmd,ncd->bcmn", tokens, text)
    a, b = masses()
    logits = {}
    for rule in ("authors", "marginal"):
        options = FedOTPOptions(eps=0.1, stop_rule=rule)
        plan = unbalanced_sinkhorn(cost, a, b, 0.1, stop_rule=rule).plan
        logits[rule] = ot_logits(tokens, text, 14.0, options)
        assert torch.allclose(logits[rule], 14.0 * (plan * (1.0 - cost)).sum(dim=(-2, -1)), atol=1e-6)
    assert float((logits["authors"] - logits["marginal"]).abs().max()) > 1e-3  # 56 iterations against 28
