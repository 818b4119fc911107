"""FedOTP: a global and a local prompt per client, matched to image regions by unbalanced OT.

Li et al., "Global and Local Prompts Cooperation via Optimal Transport for
Federated Learning" (CVPR 2024), as PROTOCOL.md section 6 defines the baseline.

Every client uses N = 2 prompts: index 0 the global prompt (averaged by
training-set size every round, FedAvg) and index 1 its local prompt, which
never leaves it. For an image with local tokens ``z_1..z_M`` (the last image
layer at every spatial position, projected to D and normalised:
:mod:`pfedmoap_cli.model.local_tokens`) and class c with prompt features
``t_{1,c}, t_{2,c}`` (normalised):

    sim[m, n] = <z_m, t_{n,c}>,   cost = 1 - sim,
    T = argmin <T, cost> - eps H(T)  s.t.  T 1_N <= 1/M,  T^T 1_M = top_percent / N
    logits[c] = s * sum_{m,n} T[m, n] * sim[m, n]

T is computed without gradient (:func:`pfedmoap_cli.methods.ot.unbalanced_sinkhorn`,
batched over images and classes, in float64 and in the log domain; it stops
on ``threshold`` under ``stop_rule`` or after ``max_iter`` iterations);
gradients reach both prompts through ``sim``. The pooled image feature is not
used (as in the reference code, which reads the local tokens only).

A participant starts from ``[global ; its local prompt]`` (the initial local
prompt if it has not trained yet), trains both prompts for the round's local
epochs with cross-entropy (lr and cosine schedule of the shared settings),
uploads the global one and keeps the local one. Every client is scored with
``[new global ; its local prompt]``.

Images: training batches are encoded to tokens on the fly (no feature cache).
Evaluation needs the test images' tokens too: the evaluator expects its
``image_features`` argument to be ``(B, 1 + M, D)`` (row 0 the pooled
feature, rows 1..M the local tokens, as returned by
:func:`pfedmoap_cli.model.local_tokens.encode_image_tokens`). The engine
provides them for methods whose class sets ``needs_local_tokens = True``; an
engine that passes pooled ``(B, D)`` features only gets a clear error.

Options
-------
eps:
    Entropic regularisation (default 0.01, the few-shot tables; 0.1 for CIFAR).
top_percent:
    Share of the image mass that is transported (default 0.8).
threshold:
    Stopping threshold of the OT iterations (default 1e-3).
max_iter:
    Iteration cap of the OT iterations (default 100).
stop_rule:
    When the OT iterations stop: ``authors`` (default; the reference's batch
    mean of ``|v - v_prev|`` in exponential-domain units, evaluated without
    overflow, which gives the reference's iteration counts) or ``marginal``
    (the largest token-marginal residual of a problem, in transported mass:
    a threshold with a fixed meaning). See :mod:`pfedmoap_cli.methods.ot`.

Reference code (``trainers/GLP_OT.py`` of the authors' FedOTP repository)
and what this module does instead:

* it runs CLIP and the transport in fp16 by default (``PREC = "fp16"``) and
  forms ``K = exp(-cost / eps)`` and iterates in that dtype: at eps 0.01, K
  is zero for costs above about 0.17 in fp16 and leaves float32's normal
  range above about 0.87; where ``K^T u`` underflows, ``v`` overflows and
  the plan holds NaN (0 * inf), its forward pass returns None and the loss
  fails. Here prompts train in fp32 and the transport runs in float64 in the
  log domain, so the plan is finite for any finite cost;
* its stopping threshold compares successive ``v``, whose scale grows like
  ``exp(cost / eps)``, so the threshold has no fixed meaning (at eps 0.01 the
  error is around 1e20-1e28 and the loop always runs ``max_iter``
  iterations). ``stop_rule=authors`` follows it (the default, so that the
  baseline is the authors' method); ``stop_rule=marginal`` is the scale-free
  alternative. Under either rule the error is taken over the whole batch
  (images times classes), so a test image's scores depend on the images
  evaluated with it, i.e. on the evaluation batch size, as in the reference;
* its ``top_percent`` is meant to be capped at the image's mass, but the cap
  is taken over the whole batch's mass (``min(sum(xx), top_percent)`` with
  ``xx`` holding every image and class), so it never applies and a value
  above 1 asks prompts for more mass than the tokens have. Here it must be in
  (0, 1];
* the defaults followed are those of its scripts: eps 0.01 (few-shot) or 0.1
  (CIFAR), top_percent 0.8, threshold 1e-3, at most 100 iterations, N = 2.

State: server ``{"ctx", "local_init"}`` (``local_init`` is the common initial
local prompt, never updated); client ``{"local_ctx"}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

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
from pfedmoap_cli.methods.local_training import cross_entropy, run_local_epochs, weighted_average
from pfedmoap_cli.methods.ot import STOP_RULES, unbalanced_sinkhorn
from pfedmoap_cli.model.local_tokens import encode_image_tokens

NUM_PROMPTS = 2  # index 0 global, index 1 local


def _fix(name: str, example: object) -> str:
    return f"pass --method-option {name}={example}"


@dataclass(frozen=True)
class FedOTPOptions:
    """FedOTP's OT settings (see the module docstring); validated on creation."""

    eps: float = 0.01
    top_percent: float = 0.8
    threshold: float = 1e-3
    max_iter: int = 100
    stop_rule: str = STOP_RULES[0]

    def __post_init__(self) -> None:
        for name, positive_only in (("eps", True), ("top_percent", True), ("threshold", False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive_only and value == 0):
                raise ConfigError(f"fedotp option {name} must be a {'positive' if positive_only else 'non-negative'} number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.top_percent > 1:
            raise ConfigError(f"fedotp option top_percent must be in (0, 1], got {self.top_percent}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ConfigError(f"fedotp option max_iter must be a positive integer, got {self.max_iter!r}")
        if self.stop_rule not in STOP_RULES:
            raise ConfigError(
                f"fedotp option stop_rule must be one of {', '.join(STOP_RULES)}, got {self.stop_rule!r}; {_fix('stop_rule', STOP_RULES[0])}"
            )


def ot_logits(local_tokens: torch.Tensor, text_features: torch.Tensor, logit_scale: float, options: FedOTPOptions) -> torch.Tensor:
    """FedOTP's logits ``(B, C)``.

    Parameters
    ----------
    local_tokens:
        ``(B, M, D)`` normalised local image tokens (constants).
    text_features:
        ``(N, C, D)`` normalised class features of the N prompts (may carry gradient).
    logit_scale:
        s.
    options:
        OT settings.
    """
    num_tokens, num_prompts = local_tokens.shape[1], text_features.shape[0]
    sim = torch.einsum("bmd,ncd->bcmn", local_tokens.to(text_features.dtype), text_features)  # (B, C, M, N)
    token_mass = torch.full((num_tokens,), 1.0 / num_tokens, device=sim.device)
    prompt_mass = torch.full((num_prompts,), min(1.0, options.top_percent) / num_prompts, device=sim.device)
    plan = unbalanced_sinkhorn(
        1.0 - sim.detach(), token_mass, prompt_mass, options.eps, options.threshold, options.max_iter, options.stop_rule
    ).plan
    return logit_scale * (plan * sim).sum(dim=(-2, -1))


def _local_part(image_tokens: torch.Tensor) -> torch.Tensor:
    if image_tokens.dim() != 3:
        raise ConfigError(
            "method fedotp needs the local image tokens of the test images (B, 1+M, D), but the engine passed pooled "
            f"features of shape {tuple(image_tokens.shape)}; this version cannot evaluate fedotp yet, choose another method"
        )
    if image_tokens.shape[1] < 2:
        raise ValueError(f"image tokens must hold the pooled token and at least one local token, got shape {tuple(image_tokens.shape)}")
    return image_tokens[:, 1:]


class TwoPromptOTEvaluator(ClientEvaluator):
    """Scores each client with [global ; its local prompt] through FedOTP's transport."""

    def __init__(self, method: "FedOTP", global_ctx: torch.Tensor, local_prompts: Mapping[int, torch.Tensor], local_init: torch.Tensor) -> None:
        self.method = method
        self.global_ctx = global_ctx
        self.local_prompts = local_prompts
        self.local_init = local_init
        self._text: dict[int | None, torch.Tensor] = {}

    def _text_features(self, client_id: int) -> torch.Tensor:
        key = client_id if client_id in self.local_prompts else None
        if key not in self._text:
            local = self.local_prompts[key] if key is not None else self.local_init
            with torch.no_grad():
                self._text[key] = self.method.env.text_encoder(self.method.stack(self.global_ctx, local))
        return self._text[key]

    def logits(self, client_id: int, image_features: torch.Tensor) -> torch.Tensor:
        tokens = _local_part(image_features)
        with torch.no_grad():
            return ot_logits(tokens, self._text_features(client_id), self.method.env.logit_scale, self.method.options)


@register_method
class FedOTP(FederatedMethod):
    name = "fedotp"
    global_part = "the global prompt, with the initial local prompt a new client starts from"
    Options = FedOTPOptions
    #: The engine must pass test images as (B, 1 + M, D) tokens (see model/local_tokens.py).
    needs_local_tokens: ClassVar[bool] = True

    def __init__(self, env, options=None) -> None:
        super().__init__(env, options or FedOTPOptions())

    @staticmethod
    def stack(global_ctx: torch.Tensor, local_ctx: torch.Tensor) -> torch.Tensor:
        """The two prompts ``(2, n_ctx, W)``: global first, local second."""
        return torch.stack([global_ctx.to(local_ctx.device, local_ctx.dtype), local_ctx])

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Global and local tokens ``(B, 1 + M, D)`` of a batch (frozen, no gradient)."""
        return encode_image_tokens(self.env.clip, images)

    # ---- server ---------------------------------------------------------
    def initial_server_state(self, generator: torch.Generator) -> State:
        encoder = self.env.text_encoder
        return {"ctx": encoder.initial_context(generator), "local_init": encoder.initial_context(generator)}

    def aggregate(self, start_state: Mapping[str, torch.Tensor], results: Mapping[int, ClientResult], round_index: int) -> State:
        if not results:
            return dict(start_state)
        order = sorted(results)  # fixed order: the float sum does not depend on scheduling
        ctx = weighted_average([results[c].upload["ctx"] for c in order], [results[c].num_examples for c in order])
        return {"ctx": ctx, "local_init": start_state["local_init"]}

    def client_download(self, server_state: Mapping[str, torch.Tensor], client_id: int, round_index: int) -> State:
        """Only the global prompt: a client starts its local prompt from :meth:`initial_state` itself."""
        return {"ctx": server_state["ctx"]}

    # ---- client ---------------------------------------------------------
    def train_client(self, job: ClientJob) -> ClientResult:
        env = self.env
        global_ctx = job.server_state["ctx"]
        local_ctx = job.client_state["local_ctx"] if job.client_state else self.initial_state()["local_init"]
        prompts = torch.nn.Parameter(self.stack(global_ctx, local_ctx).detach().clone().to(env.device, torch.float32))

        def loss_fn(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return cross_entropy(ot_logits(tokens[:, 1:], env.text_encoder(prompts), env.logit_scale, self.options), labels)

        loss = run_local_epochs(
            job.batches, [{"params": [prompts], "lr": env.training.lr, "cosine": True}], loss_fn, env.training, self.encode_tokens
        )
        trained = prompts.detach()
        return ClientResult(
            upload={"ctx": trained[0].clone()}, client_state={"local_ctx": trained[1].clone()}, num_examples=job.num_examples, train_loss=loss
        )

    # ---- evaluation -----------------------------------------------------
    def evaluator(self, view: RoundView) -> ClientEvaluator:
        local = {cid: state["local_ctx"] for cid, state in view.client_states.items() if "local_ctx" in state}
        return TwoPromptOTEvaluator(self, view.end_state["ctx"].to(self.env.device), local, view.end_state["local_init"])
