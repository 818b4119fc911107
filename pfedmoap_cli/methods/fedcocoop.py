"""FedCoCoOp: federated averaging of CoCoOp's conditional prompt (context and meta-net).

Zhou, Yang, Loy and Liu, "Conditional Prompt Learning for Vision-Language
Models" (CVPR 2022), federated as in PROTOCOL-MORE.md section 5.

Formulas as implemented
-----------------------
A learned context ``ctx`` (n_ctx, W) and a meta-net
``h(f) = W_2 relu(W_1 f + b_1) + b_2`` with ``W_1: (D // 16, D)`` (at least
one hidden unit) and ``W_2: (W, D // 16)`` (:mod:`pfedmoap_cli.model.meta_net`).
For an image with normalised feature ``f(x)`` (D), the meta-token
``pi(x) = h(f(x))`` (W) is added to every context vector,

    Z(x) = ctx + pi(x)                                   (n_ctx, W),

and the class-c text feature ``t_c(Z(x))`` is the normalised output of the
frozen text encoder on ``[SOS] Z(x) <class c> . [EOS]`` -- a different prompt
for every image. The logits and the loss of a batch are

    logits[b, c] = s * < f(x_b), t_c(Z(x_b)) >,   loss = CE(logits, y),

with ``s`` CLIP's logit scale; the text encoder runs on the (B, n_ctx, W)
stack of the batch's contexts at once and returns (B, C, D).

Each round, every participant trains a copy of the global ``ctx`` AND of the
global meta-net on its own data (the shared optimiser settings: SGD with
momentum, coupled weight decay on both, cosine over the round's local epochs,
one learning rate for both) and uploads both; the server averages every
tensor by training-set size (FedAvg over the sorted client ids). Nothing is
private: every client is scored with the global ``ctx`` and meta-net.

Cost
----
The prompt depends on the image, so the text encoder runs once per
(image, class) pair: B x C sequences per training step (with gradient,
one encoder call per batch: choose the batch size with C in mind) and
N_test x C sequences to score N_test test images. Evaluation therefore
cannot cache class text features; it runs without gradient and CHUNKED: the
images the engine hands the evaluator are split into chunks of
``max(1, eval_max_sequences // C)`` images, so one text-encoder call holds at
most ``eval_max_sequences`` sequences (default
:data:`pfedmoap_cli.model.prompt.MAX_SEQUENCES_PER_CALL`; a single image's C
sequences when C exceeds it). The logits do not depend on the chunking.

Recommended settings (the paper's): ``--ctx-init "a photo of a"`` (n_ctx 4,
the phrase's token embeddings) and ``--lr 0.002``; the context comes from the
shared training settings (``env.text_encoder.initial_context``).

Choices
-------
* Batch size. The paper trains CoCoOp with batch size 1 because of the
  per-image text passes; here the run's shared batch size applies (all
  methods of a table train on the same batches), and B x C sequences go
  through the encoder per step.
* Meta-net input. As in the authors' code, the meta-net reads the
  L2-normalised image feature (the same ``f(x)`` the logits use).
* Precision. The authors' meta-net runs in CLIP's fp16; ours keeps float32
  weights (as every trainable tensor of this package) and the text encoder's
  own autocast.
* One encoder call per batch. The authors' code loops over the images of a
  batch (C sequences per call); we stack the batch's B prompts into one call
  of the batched text encoder. Same maths, fewer calls.
* Meta-net initialisation. The authors use ``nn.Linear``'s default
  initialisation; we draw the same distribution (uniform on
  ``+-1/sqrt(fan_in)`` for weights and biases) from the experiment seed's
  "init" stream, after the context, so every party can rebuild it.
* Federation. Both the context and the meta-net are FedAvg'd, sample-weighted
  (PROTOCOL-MORE.md section 5); no part is kept private.

Options
-------
eval_max_sequences:
    Upper bound on the text sequences (images x classes) per text-encoder
    call at evaluation (default ``MAX_SEQUENCES_PER_CALL`` = 4096); at least
    one image per call.

State: server ``{"ctx", "meta.0.weight", "meta.0.bias", "meta.2.weight",
"meta.2.bias"}`` (all float32, all averaged); clients keep nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

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
from pfedmoap_cli.model.meta_net import init_meta_net, meta_net_forward, meta_net_keys
from pfedmoap_cli.model.prompt import MAX_SEQUENCES_PER_CALL, PromptTextEncoder

META_PREFIX = "meta."


@dataclass(frozen=True)
class FedCoCoOpOptions:
    eval_max_sequences: int = MAX_SEQUENCES_PER_CALL

    def __post_init__(self) -> None:
        value = self.eval_max_sequences
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"fedcocoop option eval_max_sequences must be a positive integer (e.g. 4096), got {value!r}")


def conditional_contexts(state: Mapping[str, torch.Tensor], image_features: torch.Tensor) -> torch.Tensor:
    """``Z(x_b) = ctx + h(f(x_b))`` for a batch: (B, D) features -> (B, n_ctx, W) contexts."""
    shift = meta_net_forward(state, image_features, META_PREFIX)
    return state["ctx"].unsqueeze(0) + shift.unsqueeze(1)


def conditional_logits(
    text_encoder: PromptTextEncoder, state: Mapping[str, torch.Tensor], image_features: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """``s * <f(x_b), t_c(Z(x_b))>`` (B, C) in one text-encoder call of B x C sequences (differentiable)."""
    text = text_encoder(conditional_contexts(state, image_features))  # (B, C, D)
    features = image_features.to(text.dtype)
    return logit_scale * torch.einsum("bd,bcd->bc", features, text)


class ConditionalPromptEvaluator(ClientEvaluator):
    """Scores images with their own prompts, in chunks of at most ``max_sequences`` text sequences per call."""

    def __init__(self, text_encoder: PromptTextEncoder, logit_scale: float, state: Mapping[str, torch.Tensor], max_sequences: int) -> None:
        self.text_encoder = text_encoder
        self.logit_scale = logit_scale
        # The trained tensors, on the encoder's device once (text features depend on the image: nothing else to cache).
        self.state = {key: value.detach().to(text_encoder.device, torch.float32) for key, value in state.items()}
        self.images_per_call = max(1, int(max_sequences) // text_encoder.num_classes)

    def logits(self, client_id: int, image_features: torch.Tensor) -> torch.Tensor:
        features = image_features.to(self.text_encoder.device)
        if features.shape[0] == 0:
            return torch.empty(0, self.text_encoder.num_classes, device=features.device)
        step = self.images_per_call
        with torch.no_grad():
            chunks = [
                conditional_logits(self.text_encoder, self.state, features[start : start + step], self.logit_scale)
                for start in range(0, features.shape[0], step)
            ]
        return torch.cat(chunks)


@register_method
class FedCoCoOp(FederatedMethod):
    name = "fedcocoop"
    global_part = "the global context and meta-net"
    Options = FedCoCoOpOptions

    def __init__(self, env, options=None) -> None:
        super().__init__(env, options or FedCoCoOpOptions())

    # ---- server ---------------------------------------------------------
    def initial_server_state(self, generator: torch.Generator) -> State:
        ctx = self.env.text_encoder.initial_context(generator)
        meta = init_meta_net(self.env.clip.embed_dim, self.env.text_encoder.width, generator, META_PREFIX, device=ctx.device)
        return {"ctx": ctx, **meta}

    def aggregate(self, start_state: Mapping[str, torch.Tensor], results: Mapping[int, ClientResult], round_index: int) -> State:
        if not results:
            return dict(start_state)
        order = sorted(results)  # a fixed order keeps the float sums independent of scheduling
        weights = [results[c].num_examples for c in order]
        return {key: weighted_average([results[c].upload[key] for c in order], weights) for key in start_state}

    # ---- client ---------------------------------------------------------
    def train_client(self, job: ClientJob) -> ClientResult:
        env = self.env
        keys = ("ctx", *meta_net_keys(META_PREFIX))
        params = {key: torch.nn.Parameter(job.server_state[key].detach().clone().to(env.device, torch.float32)) for key in keys}

        def loss_fn(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return cross_entropy(conditional_logits(env.text_encoder, params, features, env.logit_scale), labels)

        loss = run_local_epochs(
            job.batches, [{"params": list(params.values()), "lr": env.training.lr, "cosine": True}], loss_fn, env.training, env.clip.encode_images
        )
        upload = {key: param.detach().clone() for key, param in params.items()}
        return ClientResult(upload=upload, client_state={}, num_examples=job.num_examples, train_loss=loss)

    # ---- evaluation -----------------------------------------------------
    def evaluator(self, view: RoundView) -> ClientEvaluator:
        return ConditionalPromptEvaluator(self.env.text_encoder, self.env.logit_scale, view.end_state, self.options.eval_max_sequences)
