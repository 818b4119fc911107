"""FedPGP: a global prompt plus a private low-rank correction, kept close to CLIP by a contrastive term.

Tianyu Cui, Hongxia Li, Jingya Wang and Ye Shi, "Harmonizing Generalization and
Personalization in Federated Prompt Learning" (ICML 2024); PROTOCOL-MORE.md
section 3.

Formulas as implemented
-----------------------
Client k's context is ``Z_k = sigma + U_k V_k``: ``sigma`` (n_ctx, W) is global
(server, sample-weighted FedAvg), ``U_k`` (n_ctx, r) and ``V_k`` (r, W) are the
client's private low-rank factors, which never leave it. Down: ``sigma``;
up: the trained ``sigma_k``. At every local step, over all C classes,

* ``t_full = t(sigma + U V)`` (gradient to sigma, U and V),
* ``t_sig = t(sigma)`` (gradient to sigma),
* ``t_0`` the frozen anchor features (below; computed once per method
  instance, no gradient),

and the loss of a batch (f its normalised image features, s CLIP's logit scale) is

    CE(s f t_full^T, y) + mu * mean_c -log( e^{a_c/tau} / (e^{a_c/tau} + e^{b_c/tau}) ),
    a_c = cos(t_0c, t_sig c)   (positive pair),
    b_c = cos(t_sig c, t_full c)   (negative pair).

The contrastive term depends on the prompts only, never on the images. Both
text features come from one encoder call on the stacked contexts
``[sigma + U V, sigma]``. A client is scored with ``s f t(sigma + U_k V_k)^T``,
``sigma`` the aggregated global context of the round and ``U_k, V_k`` its own
factors (the initial ones for a client that has never trained).

Initialisation: ``sigma`` is the encoder's initial context (N(0, 0.02^2), or
the ``--ctx-init`` phrase's embeddings when one is given), then ``U`` and
``V`` are drawn N(0, 0.02^2) from the same seeded "init" stream, so every
client starts from the same ``U, V``. The server state keeps those initial
factors (``U_init``, ``V_init``) only so that they are reproducible; they are
never sent, averaged or changed: a client without state rebuilds them from
:meth:`FederatedMethod.initial_state`, like every party can.

Choices
-------
* Anchor ``t_0``: the paper describes a zero-shot CLIP text feature; the
  authors' code encodes the raw ``"X X ... X <name>."`` prompt (the
  placeholder-token embeddings themselves, no learned context). We follow the
  code by default (``anchor="placeholder"``: the prompt encoder applied to
  its own placeholder embeddings, which are the phrase's embeddings under
  ``--ctx-init``); ``anchor="zeroshot"`` uses ``"a photo of a {name}."``.
* Learning rate: the recipe's rate is constant (no schedule). Our shared loop
  anneals each group with a cosine over the round's local epochs when asked;
  FedPGP does not ask by default (``constant_lr=True``), so sigma, U and V
  (three optimiser groups, the same lr) keep ``--lr`` for the whole round.
  ``constant_lr=false`` restores the common cosine rule.
* One prompt per client (the authors' script uses two prompts, which doubles
  the classifier: not reproduced).
* No lock-step batched hook: clients train one after another.

Recommended shared settings (the authors'; a recipe sets them):
``--n-ctx 16``, ``--lr 0.001`` (constant, see above), ``--local-epochs 2``,
25 rounds.

Options
-------
rank:
    r, the rank of the private correction ``U V`` (default 8).
mu:
    Weight of the contrastive term (default 0.5; 0 trains CE only).
tau:
    Temperature of the contrastive term (default 0.5).
anchor:
    ``"placeholder"`` (default, the authors' code) or ``"zeroshot"``.
constant_lr:
    Keep the learning rate constant within a round (default true); false
    uses the common cosine schedule.

State: server ``{"sigma", "U_init", "V_init"}`` (only ``sigma`` is ever
sent or changed); client ``{"U", "V"}`` (private).
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
from pfedmoap_cli.methods.local_training import cross_entropy, prompt_logits, run_local_epochs, weighted_average
from pfedmoap_cli.model.prompt import INIT_STD, encode_texts

ANCHORS = ("placeholder", "zeroshot")
ZERO_SHOT_TEMPLATE = "a photo of a {}."


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


@dataclass(frozen=True)
class FedPGPOptions:
    """FedPGP's settings (see the module docstring); validated on creation."""

    rank: int = 8
    mu: float = 0.5
    tau: float = 0.5
    anchor: str = ANCHORS[0]
    constant_lr: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"fedpgp option rank must be a positive integer, got {self.rank!r}; pass --method-option rank=8")
        if not _is_number(self.mu) or not self.mu >= 0 or self.mu == float("inf"):
            raise ConfigError(f"fedpgp option mu must be a non-negative number, got {self.mu!r}; pass --method-option mu=0.5")
        if not _is_number(self.tau) or not self.tau > 0 or self.tau == float("inf"):
            raise ConfigError(f"fedpgp option tau must be a positive number, got {self.tau!r}; pass --method-option tau=0.5")
        if self.anchor not in ANCHORS:
            raise ConfigError(f"fedpgp option anchor must be one of {', '.join(ANCHORS)}, got {self.anchor!r}; pass --method-option anchor={ANCHORS[0]}")
        if not isinstance(self.constant_lr, bool):
            raise ConfigError(f"fedpgp option constant_lr must be true or false, got {self.constant_lr!r}; pass --method-option constant_lr=true")
        object.__setattr__(self, "mu", float(self.mu))
        object.__setattr__(self, "tau", float(self.tau))


def contrastive_term(anchor: torch.Tensor, t_sig: torch.Tensor, t_full: torch.Tensor, tau: float) -> torch.Tensor:
    """``mean_c -log(e^{a_c/tau} / (e^{a_c/tau} + e^{b_c/tau}))``, a = cos(anchor, t_sig), b = cos(t_sig, t_full).

    All three are (C, D); the positive pair is (anchor, sigma's features), the
    negative one (sigma's features, the personal context's features).
    """
    positive = F.cosine_similarity(anchor, t_sig, dim=-1)
    negative = F.cosine_similarity(t_sig, t_full, dim=-1)
    pair_logits = torch.stack([positive, negative], dim=1) / tau
    target = torch.zeros(pair_logits.shape[0], dtype=torch.long, device=pair_logits.device)
    return F.cross_entropy(pair_logits, target)


class PersonalContextEvaluator(ClientEvaluator):
    """Scores client k with ``t(sigma + U_k V_k)``; clients without factors use the initial ones (cached per client)."""

    def __init__(self, text_encoder, logit_scale: float, sigma: torch.Tensor, factors: dict[int, tuple[torch.Tensor, torch.Tensor]], fallback: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.text_encoder = text_encoder
        self.logit_scale = logit_scale
        self.sigma = sigma
        self.factors = factors
        self.fallback = fallback
        self._text: dict[int | None, torch.Tensor] = {}

    def _features(self, client_id: int) -> torch.Tensor:
        key = client_id if client_id in self.factors else None
        if key not in self._text:
            u, v = self.factors[key] if key is not None else self.fallback
            sigma = self.sigma.to(u.device, torch.float32)
            with torch.no_grad():
                self._text[key] = self.text_encoder(sigma + u @ v)
        return self._text[key]

    def logits(self, client_id: int, image_features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return prompt_logits(image_features, self._features(client_id), self.logit_scale)


@register_method
class FedPGP(FederatedMethod):
    name = "fedpgp"
    global_part = "the global context sigma, with the initial U V a new client starts from"
    Options = FedPGPOptions

    def __init__(self, env, options=None) -> None:
        super().__init__(env, options or FedPGPOptions())
        self._anchor: torch.Tensor | None = None

    # ---- server ---------------------------------------------------------
    def initial_server_state(self, generator: torch.Generator) -> State:
        encoder = self.env.text_encoder
        sigma = encoder.initial_context(generator)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        rank = self.options.rank
        u = torch.empty(encoder.n_ctx, rank, dtype=torch.float32, device=gen_device).normal_(0.0, INIT_STD, generator=generator)
        v = torch.empty(rank, encoder.width, dtype=torch.float32, device=gen_device).normal_(0.0, INIT_STD, generator=generator)
        return {"sigma": sigma, "U_init": u.to(sigma.device), "V_init": v.to(sigma.device)}

    def client_download(self, server_state: Mapping[str, torch.Tensor], client_id: int, round_index: int) -> State:
        """Only ``sigma``: the private factors start from :meth:`initial_state` on the client itself."""
        return {"sigma": server_state["sigma"]}

    def evaluation_download(self, view: RoundView, client_id: int) -> State:
        """Only the aggregated ``sigma``; the client adds its own (or the initial) factors."""
        return {"sigma": view.end_state["sigma"]}

    def aggregate(self, start_state: Mapping[str, torch.Tensor], results: Mapping[int, ClientResult], round_index: int) -> State:
        if not results:
            return dict(start_state)
        order = sorted(results)  # fixed order: the float sum does not depend on scheduling
        sigma = weighted_average([results[c].upload["sigma"] for c in order], [results[c].num_examples for c in order])
        return {"sigma": sigma, "U_init": start_state["U_init"], "V_init": start_state["V_init"]}

    # ---- client ---------------------------------------------------------
    def anchor_features(self) -> torch.Tensor:
        """The frozen anchor ``t_0`` (C, D), computed once per method instance."""
        if self._anchor is None:
            encoder = self.env.text_encoder
            with torch.no_grad():
                if self.options.anchor == "placeholder":
                    placeholder = encoder.embedding[0, 1 : 1 + encoder.n_ctx].detach().float()
                    self._anchor = encoder(placeholder).detach()
                else:
                    texts = [ZERO_SHOT_TEMPLATE.format(name.replace("_", " ")) for name in self.env.class_names]
                    self._anchor = encode_texts(self.env.clip, texts).to(encoder.device)
        return self._anchor

    def private_factors(self, client_state: State | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The client's ``(U, V)``, or the run's initial ones for a client without state."""
        if client_state:
            return client_state["U"], client_state["V"]
        initial = self.initial_state()
        return initial["U_init"], initial["V_init"]

    def train_client(self, job: ClientJob) -> ClientResult:
        env, options = self.env, self.options
        device = env.device
        u_start, v_start = self.private_factors(job.client_state)
        sigma = torch.nn.Parameter(job.server_state["sigma"].detach().clone().to(device, torch.float32))
        u = torch.nn.Parameter(u_start.detach().clone().to(device, torch.float32))
        v = torch.nn.Parameter(v_start.detach().clone().to(device, torch.float32))
        anchor = self.anchor_features() if options.mu > 0 else None

        def loss_fn(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            if options.mu == 0:  # CE only: t(sigma) is not needed
                return cross_entropy(prompt_logits(features, env.text_encoder(sigma + u @ v), env.logit_scale), labels)
            text = env.text_encoder(torch.stack([sigma + u @ v, sigma]))  # one call, (2, C, D): t_full, t_sig
            t_full, t_sig = text[0], text[1]
            loss = cross_entropy(prompt_logits(features, t_full, env.logit_scale), labels)
            return loss + options.mu * contrastive_term(anchor, t_sig, t_full, options.tau)

        cosine = not options.constant_lr
        groups = [{"params": [p], "lr": env.training.lr, "cosine": cosine} for p in (sigma, u, v)]
        loss = run_local_epochs(job.batches, groups, loss_fn, env.training, env.clip.encode_images)
        return ClientResult(
            upload={"sigma": sigma.detach().clone()},
            client_state={"U": u.detach().clone(), "V": v.detach().clone()},
            num_examples=job.num_examples,
            train_loss=loss,
        )

    # ---- evaluation -----------------------------------------------------
    def evaluator(self, view: RoundView) -> ClientEvaluator:
        factors = {cid: (state["U"], state["V"]) for cid, state in view.client_states.items() if "U" in state and "V" in state}
        if "U_init" in view.end_state and "V_init" in view.end_state:
            fallback = (view.end_state["U_init"], view.end_state["V_init"])
        else:  # a node scoring from its evaluation download (sigma only) rebuilds the initial factors
            fallback = self.private_factors(None)
        return PersonalContextEvaluator(self.env.text_encoder, self.env.logit_scale, view.end_state["sigma"], factors, fallback)
