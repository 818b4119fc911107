"""FedTPG: a federated text-driven prompt generator.

Chen Qiu, Xingyu Li, Chaithanya Kumar Mummadi, Madan Ravi Ganesh, Zhenzhen
Li, Lu Peng and Wan-Yi Lin, "Federated Text-driven Prompt Generation for
Vision-Language Models", ICLR 2024 (arXiv 2310.06123; PROTOCOL-MORE.md
section 4). Instead of a context, the federation learns one global generator
``g`` that maps the class names of a label set to the context of its prompts.

Formulas as implemented
-----------------------
For a label set with class names ``n_1 .. n_C``:

    E   = [normalise(T_clip(n_c))]_c                       (C_set, D), frozen, cached
    Z   = g(E)                                             (n_ctx, W)
    t_c = normalise(f_text([Z ; name_c]))                  CoOp's prompt "Z name_c."
    logits = s * f(x) t^T,   loss = CE(logits, y)

``T_clip(n_c)`` is CLIP's text feature of the bare class name (underscores as
spaces, no template, no full stop). ``g`` is
:class:`pfedmoap_cli.model.prompt_generator.PromptGenerator`: learnable
queries attend to the layer-normed ``E`` (4 heads by default, no residual),
followed by a residual GEGLU feed-forward; see that module for the formula.

Each round the participants train a copy of every generator weight on their
data (the round's local epochs, one SGD group with the cosine schedule) and
upload all of them; the server averages every weight (FedAvg). Every client is
scored with the global generator. Clients keep nothing.

Choices
-------
* Label set. The paper (and the authors' code) conditions the generator on
  the client's own classes in training and local tests, and on all base or
  all novel classes in the generalisation tests. Our evaluation classifies
  over ALL classes of ``env.class_names`` (argmax over C), so we condition on
  all C class names both in training and in evaluation: the logits the model
  is trained on are then the ones it is scored with. The label set is an
  argument of the generator (its class-name features) and of
  :meth:`FedTPG.context` / :meth:`FedTPG.class_name_features`, so a
  base-to-novel evaluation can condition on the base or the novel set.
* Aggregation. The authors' code averages the clients' generators with equal
  weights (the paper writes FedAvg); ``weighted=False`` (default) follows the
  code, ``weighted=True`` weights by training-set size as PROTOCOL.md's FedAvg.
  Either way the sum runs over sorted client ids (a fixed float order).
* Initialisation. Queries ~ N(0, 0.02^2); the layers use PyTorch's default
  schemes, drawn from the experiment seed's "init" stream (not the global RNG)
  so every party rebuilds the same initial generator. ``--ctx-init`` has no
  effect on FedTPG (the context is generated); ``--n-ctx`` sets n_ctx.
* Parameter count: 4,206,080 at W = D = 512 and n_ctx = 4 (ViT-B/16),
  measured by constructing the generator; the paper's "about 4.2M".

Recommended shared settings (the paper's, set by the recipes): n_ctx 4,
SGD lr 0.003, weight decay 1e-5, 8 shots, 20 classes per client, training
with the test transform (no augmentation), cosine schedule.

Options
-------
num_heads:
    Attention heads of the generator (default 4); must divide the text width W.
weighted:
    Weight the server average by training-set size (default False: the
    unweighted mean of the authors' code).

State: server ``{"generator.<name>"}``, every weight of the generator
(its ``state_dict`` keys, e.g. ``generator.queries``,
``generator.attn.out_proj.weight``); clients keep nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

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
from pfedmoap_cli.methods.local_training import cross_entropy, prompt_logits, run_local_epochs, weighted_average
from pfedmoap_cli.methods.zsclip import SharedTextEvaluator
from pfedmoap_cli.model.prompt import encode_texts
from pfedmoap_cli.model.prompt_generator import (
    STATE_PREFIX,
    PromptGenerator,
    generator_from_state,
    generator_state,
)


def _fix(name: str, example: Any) -> str:
    return f"pass --method-option {name}={example}"


@dataclass(frozen=True)
class FedTPGOptions:
    num_heads: int = 4
    weighted: bool = False

    def __post_init__(self) -> None:
        heads = self.num_heads
        integral = isinstance(heads, int) or (isinstance(heads, float) and heads.is_integer())
        if isinstance(heads, bool) or not integral or int(heads) < 1:
            raise ConfigError(f"fedtpg option num_heads must be a positive integer, got {heads!r}; {_fix('num_heads', 4)}")
        object.__setattr__(self, "num_heads", int(heads))
        weighted = self.weighted
        if isinstance(weighted, str) and weighted.lower() in {"true", "false"}:
            weighted = weighted.lower() == "true"
        if not isinstance(weighted, bool):
            raise ConfigError(f"fedtpg option weighted must be true or false, got {self.weighted!r}; {_fix('weighted', 'false')}")
        object.__setattr__(self, "weighted", weighted)


def bare_class_name(name: str) -> str:
    """The text of a class name as the generator reads it: underscores as spaces, nothing else."""
    return name.replace("_", " ").strip()


@register_method
class FedTPG(FederatedMethod):
    name = "fedtpg"
    global_part = "the global prompt generator, conditioned on the new class names"
    Options = FedTPGOptions

    def __init__(self, env, options=None) -> None:
        super().__init__(env, options or FedTPGOptions())
        self.n_ctx = env.text_encoder.n_ctx
        self.width = env.text_encoder.width
        self.text_dim = env.clip.embed_dim
        heads = self.options.num_heads
        if self.width % heads != 0:
            raise ConfigError(
                f"fedtpg option num_heads={heads} must divide the text width {self.width}; "
                f"{_fix('num_heads', 'N')} with N a divisor of {self.width}"
            )
        self._name_features: dict[tuple[str, ...], torch.Tensor] = {}

    # ---- the generator ----------------------------------------------------
    def class_name_features(self, class_names: Sequence[str] | None = None) -> torch.Tensor:
        """E (C_set, D): normalised frozen CLIP features of the bare names (default: all classes), cached."""
        names = tuple(bare_class_name(n) for n in (class_names if class_names is not None else self.env.class_names))
        if names not in self._name_features:
            self._name_features[names] = encode_texts(self.env.clip, list(names)).to(self.env.device, torch.float32)
        return self._name_features[names]

    def generator(self, state: Mapping[str, torch.Tensor]) -> PromptGenerator:
        """A trainable module holding the generator weights of ``state`` (copies), on the method's device."""
        return generator_from_state(state, self.options.num_heads, STATE_PREFIX, self.env.device)

    def context(self, state: Mapping[str, torch.Tensor], class_names: Sequence[str] | None = None) -> torch.Tensor:
        """Z = g(E) (n_ctx, W) for the label set ``class_names`` (default: all classes), without gradient."""
        with torch.no_grad():
            return self.generator(state)(self.class_name_features(class_names))

    # ---- server -------------------------------------------------------------
    def initial_server_state(self, generator: torch.Generator) -> State:
        module = PromptGenerator(self.n_ctx, self.width, self.text_dim, self.options.num_heads, generator=generator)
        return generator_state(module, STATE_PREFIX)

    def aggregate(self, start_state: Mapping[str, torch.Tensor], results: Mapping[int, ClientResult], round_index: int) -> State:
        """FedAvg of every generator weight: unweighted mean, or by training-set size when ``weighted``."""
        if not results:
            return dict(start_state)
        order = sorted(results)  # a fixed order keeps the float sum independent of scheduling
        weights = [float(results[c].num_examples) if self.options.weighted else 1.0 for c in order]
        return {key: weighted_average([results[c].upload[key] for c in order], weights) for key in start_state}

    # ---- client -------------------------------------------------------------
    def train_client(self, job: ClientJob) -> ClientResult:
        env = self.env
        module = self.generator(job.server_state)
        names = self.class_name_features()  # all C classes: the label set evaluation classifies over

        def loss_fn(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            text = env.text_encoder(module(names))
            return cross_entropy(prompt_logits(features, text, env.logit_scale), labels)

        groups = [{"params": list(module.parameters()), "lr": env.training.lr, "cosine": True}]
        loss = run_local_epochs(job.batches, groups, loss_fn, env.training, env.clip.encode_images)
        return ClientResult(upload=generator_state(module, STATE_PREFIX), client_state={}, num_examples=job.num_examples, train_loss=loss)

    # ---- evaluation -----------------------------------------------------------
    def evaluator(self, view: RoundView) -> ClientEvaluator:
        state = {k: v.to(self.env.device) for k, v in view.end_state.items()}
        with torch.no_grad():
            text = self.env.text_encoder(self.context(state))
        return SharedTextEvaluator(text, self.env.logit_scale)
