"""FedKgCoOp: PromptFL with KgCoOp's knowledge-guided anchor on the text features.

Hantao Yao, Rui Zhang and Changsheng Xu, "Visual-Language Prompt Tuning with
Knowledge-guided Context Optimization" (CVPR 2023), federated as in the
baselines of Qiu et al., "Text-driven Prompt Generation for Vision-Language
Models in Federated Learning" (FedTPG, ICLR 2024); PROTOCOL-MORE.md section 1.

One global context ``ctx`` (n_ctx, W), as in PromptFL. Each participant starts
from the downloaded ``ctx`` and minimises, per batch,

    CE(s * f T(ctx)^T, y) + lambda * (1 - (1/C) sum_c cos(t_c(ctx), h_c))

where ``t_c(ctx)`` is the normalised text feature of class c under the learned
context (all C classes of the dataset), ``h_c`` the normalised frozen CLIP text
feature of the hand-written ``template`` filled with class c's name (computed
once per method object and cached), and ``s = exp(logit_scale)``. Both are unit
vectors, so ``cos`` is their dot product. The text encoder runs once per step:
the same ``T(ctx)`` gives the logits and the anchor term. The server averages
the uploaded contexts (FedAvg); every client is scored with ``s * f T(ctx)^T``
of the global context (PromptFL's evaluator).

Choices
-------
* lambda = 8 in the cosine form ``1 - mean cos`` (KgCoOp's code); the paper
  writes the squared distance ``||t - h||^2 = 2 (1 - cos)`` with weight 4, the
  same loss.
* Aggregation: sample-weighted FedAvg by default (our common rule); FedTPG's
  code averages its FedKgCoOp clients unweighted, available as
  ``weighted=false``.
* Anchor template: KgCoOp uses a per-dataset hand-written template (e.g.
  ``"a photo of a {}, a type of flower."`` for Flowers102). No table is built
  in: the default is the generic ``"a photo of a {}."`` and a dataset's
  template is set with ``--method-option template=...`` (or a recipe's
  ``method_options``). Class names have underscores replaced by spaces, as for
  the learned prompts and ZS-CLIP.

Options
-------
kg_weight:
    lambda, the weight of the anchor term (default 8.0; 0 gives PromptFL).
template:
    The anchor prompt with ``{}`` where the class name goes (default
    ``"a photo of a {}."``).
weighted:
    True (default): FedAvg weighted by training-set size; False: the plain
    mean of the participants' contexts (FedTPG's code).

State: server ``{"ctx"}``; clients keep nothing. Down and up: ``ctx``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from pfedmoap_cli.engine.batched_round import run_local_epochs_batched
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.base import ClientJob, ClientResult, State, register_method
from pfedmoap_cli.methods.local_training import cross_entropy, prompt_logits, run_local_epochs, weighted_average
from pfedmoap_cli.methods.promptfl import PromptFL
from pfedmoap_cli.model.prompt import encode_texts

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class FedKgCoOpOptions:
    kg_weight: float = 8.0
    template: str = DEFAULT_TEMPLATE
    weighted: bool = True

    def __post_init__(self) -> None:
        weight = self.kg_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"fedkgcoop option kg_weight must be a finite number >= 0, got {weight!r}; pass --method-option kg_weight=8")
        object.__setattr__(self, "kg_weight", float(weight))
        template = self.template
        try:
            usable = isinstance(template, str) and template.count("{}") == 1 and template.format("x") != template
        except (IndexError, KeyError, ValueError):
            usable = False
        if not usable:
            raise ConfigError(
                f"fedkgcoop option template must be a prompt with one {{}} where the class name goes and no other braces, "
                f"got {template!r}; pass --method-option 'template=a photo of a {{}}.'"
            )
        if not isinstance(self.weighted, bool):
            raise ConfigError(f"fedkgcoop option weighted must be true or false, got {self.weighted!r}; pass --method-option weighted=true")


def anchor_texts(template: str, class_names: Sequence[str]) -> list[str]:
    """The hand-written anchor prompt of every class, in label order."""
    return [template.format(name.replace("_", " ").strip()) for name in class_names]


@register_method
class FedKgCoOp(PromptFL):
    name = "fedkgcoop"
    Options = FedKgCoOpOptions

    def __init__(self, env, options=None) -> None:
        super().__init__(env, options or FedKgCoOpOptions())
        self._anchors: torch.Tensor | None = None

    # ---- the loss -------------------------------------------------------
    def anchors(self) -> torch.Tensor:
        """h (C, D): normalised frozen CLIP text features of the template prompts (computed once)."""
        if self._anchors is None:
            texts = anchor_texts(self.options.template, self.env.class_names)
            self._anchors = encode_texts(self.env.clip, texts).to(self.env.device, torch.float32)
        return self._anchors

    def loss(self, features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """CE(s f T^T, y) + lambda (1 - mean_c <t_c, h_c>) for normalised class features ``text`` (C, D)."""
        ce = cross_entropy(prompt_logits(features, text, self.env.logit_scale), labels)
        if self.options.kg_weight == 0:
            return ce
        anchors = self.anchors().to(text.device)
        agreement = (text * anchors).sum(dim=-1).mean()
        return ce + self.options.kg_weight * (1.0 - agreement)

    # ---- client ---------------------------------------------------------
    def train_client(self, job: ClientJob) -> ClientResult:
        env = self.env
        ctx = torch.nn.Parameter(job.server_state["ctx"].detach().clone().to(env.device, torch.float32))

        def loss_fn(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return self.loss(features, labels, env.text_encoder(ctx))

        loss = run_local_epochs(job.batches, [{"params": [ctx], "lr": env.training.lr, "cosine": True}], loss_fn, env.training, env.clip.encode_images)
        return ClientResult(upload={"ctx": ctx.detach()}, client_state={}, num_examples=job.num_examples, train_loss=loss)

    def train_clients_batched(self, jobs: Sequence[ClientJob]) -> list[ClientResult]:
        """Every participant's copy of the global context trained in lock step (one text-encoder call per step)."""
        env = self.env
        ctx = torch.nn.Parameter(torch.stack([job.server_state["ctx"].detach().to(env.device, torch.float32) for job in jobs]))

        def loss_fn(positions: list[int], features: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
            text = env.text_encoder(ctx.index_select(0, torch.tensor(positions, device=ctx.device)))
            return torch.stack([self.loss(feats, y, text[row]) for row, (feats, y) in enumerate(zip(features, labels))])

        losses = run_local_epochs_batched(
            jobs, [{"params": [ctx], "lr": env.training.lr, "cosine": True}], loss_fn, env.training, env.clip.encode_images
        )
        return [
            ClientResult(upload={"ctx": row.clone()}, client_state={}, num_examples=job.num_examples, train_loss=loss)
            for job, row, loss in zip(jobs, ctx.detach(), losses)
        ]

    # ---- server ---------------------------------------------------------
    def aggregate(self, start_state: Mapping[str, torch.Tensor], results: Mapping[int, ClientResult], round_index: int) -> State:
        if not results:
            return dict(start_state)
        order = sorted(results)  # a fixed order keeps the float sum independent of scheduling
        weights = [results[c].num_examples if self.options.weighted else 1 for c in order]
        return {"ctx": weighted_average([results[c].upload["ctx"] for c in order], weights)}

    # ---- evaluation: PromptFL's global prompt (inherited) ---------------
