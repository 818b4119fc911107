"""pFedPrompt: a federated text prompt plus a personal visual module over a few-shot memory.

Guo et al., "pFedPrompt: Learning Personalized Prompt for Vision-Language
Models in Federated Learning" (WWW 2023), as PROTOCOL.md section 6 defines the
baseline: a global text prompt trained with FedAvg, and on every client a
personal visual module that never leaves it -- a memory of the client's
few-shot image features and labels, and a small learnable attention over that
memory whose class scores are added to the text logits.

Client i's logits for a normalised image feature I (D):

    q = I W_q,   k_j = m_j W_k                     (W_q, W_k: D x d, learnable)
    a = softmax(scale * q k^T)                     (attention over the n memory entries)
    p = a Y                                        (Y: n x C one-hot memory labels; p: class scores, summing to 1)
    logits = s * I T(ctx)^T + alpha * s * p

The memory ``(m_j, y_j)`` is built once, at the client's first
participation, from the frozen CLIP features of all its training images under
the deterministic test transform (one un-augmented view per image, in a fixed
order), and then kept. Building it draws from no random stream, so the
client's training data order and augmentation are the same as without it. W_q = W_k
start as the same random Gaussian matrix with variance 1/d, so that
``q . k ~ cos(I, m_j)`` at first (a Johnson-Lindenstrauss projection): the
attention starts as a softmax over feature similarities and learns from there.

Each round a participant trains the global prompt (lr of the shared
settings, cosine schedule) jointly with its attention (``attention_lr``,
constant, as pFedMoAP's gating network) on the cross-entropy of these logits,
and uploads the prompt only. The server averages the prompts (FedAvg). Every
client is scored with the new global prompt plus its own visual module (text
logits only for a client that has not trained yet).

Options
-------
attention_dim:
    d, the width of the attention's query/key projections (default 128).
attention_lr:
    Learning rate of W_q and W_k (default 0.01, constant).
scale:
    Attention temperature multiplier (default 10).
alpha:
    Weight of the visual class scores (default 1.0; they are scaled by s too).

State: server ``{"ctx"}``; client ``{"memory_features" (n, D), "memory_labels" (n,)
int64, "attn_q" (D, d), "attn_k" (D, d)}`` -- all of it stays on the client.
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
    RoundView,
    State,
    register_method,
)
from pfedmoap_cli.methods.local_training import cross_entropy, prompt_logits, run_local_epochs
from pfedmoap_cli.methods.promptfl import PromptFL

MEMORY_KEYS = ("memory_features", "memory_labels")


@dataclass(frozen=True)
class PFedPromptOptions:
    attention_dim: int = 128
    attention_lr: float = 0.01
    scale: float = 10.0
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.attention_dim, bool) or not isinstance(self.attention_dim, int) or self.attention_dim < 1:
            raise ConfigError(f"pfedprompt option attention_dim must be a positive integer, got {self.attention_dim!r}")
        for name in ("attention_lr", "scale", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (name == "attention_lr" and value == 0):
                raise ConfigError(f"pfedprompt option {name} must be a {'positive' if name == 'attention_lr' else 'non-negative'} number, got {value!r}")
            object.__setattr__(self, name, float(value))


def visual_scores(
    features: torch.Tensor,
    memory_features: torch.Tensor,
    memory_labels: torch.Tensor,
    attn_q: torch.Tensor,
    attn_k: torch.Tensor,
    scale: float,
    num_classes: int,
) -> torch.Tensor:
    """Class scores ``(B, C)`` of the personal attention over the memory (rows sum to 1)."""
    query = features @ attn_q  # (B, d)
    keys = memory_features @ attn_k  # (n, d)
    attention = torch.softmax(scale * query @ keys.t(), dim=-1)  # (B, n)
    return attention @ F.one_hot(memory_labels.long(), num_classes).to(attention.dtype)


class PersonalVisualEvaluator(ClientEvaluator):
    """Global text logits plus each client's own visual scores."""

    def __init__(self, method: "PFedPrompt", text_features: torch.Tensor, client_states: Mapping[int, State]) -> None:
        self.method = method
        self.text_features = text_features
        self.client_states = client_states

    def logits(self, client_id: int, image_features: torch.Tensor) -> torch.Tensor:
        state = self.client_states.get(client_id)
        if not state or "attn_q" not in state:
            return prompt_logits(image_features, self.text_features, self.method.env.logit_scale)
        return self.method.combined_logits(image_features, self.text_features, state)


@register_method
class PFedPrompt(PromptFL):
    name = "pfedprompt"
    label_set_free = False  # each client's visual memory holds features labelled with the training classes
    global_part = "the global text prompt (the private visual memories stay on the clients)"
    Options = PFedPromptOptions

    def __init__(self, env, options=None) -> None:
        super().__init__(env, options or PFedPromptOptions())

    # ---- the personal module -------------------------------------------
    def combined_logits(self, features: torch.Tensor, text_features: torch.Tensor, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``s * I T^T + alpha * s * p`` for one client's module (``state``)."""
        env, options = self.env, self.options
        scores = visual_scores(
            features, state["memory_features"], state["memory_labels"], state["attn_q"], state["attn_k"], options.scale, len(env.class_names)
        )
        return prompt_logits(features, text_features, env.logit_scale) + options.alpha * env.logit_scale * scores

    @torch.no_grad()
    def build_memory(self, job: ClientJob) -> State:
        """Frozen features and labels of the client's training images, test transform, fixed order."""
        if job.plain_batches is None:
            raise ValueError("pfedprompt needs the client's un-augmented training images (ClientJob.plain_batches)")
        features, labels = [], []
        for images, batch_labels in job.plain_batches():
            features.append(self.env.clip.encode_images(images))
            labels.append(batch_labels.to(self.env.device))
        return {"memory_features": torch.cat(features).float(), "memory_labels": torch.cat(labels).long()}

    def initial_attention(self, generator: torch.Generator) -> State:
        """W_q = W_k = G / sqrt(d), G standard Gaussian (D x d), so that q . k ~ I . m at first."""
        dim, width = self.options.attention_dim, self.env.clip.embed_dim
        projection = torch.randn(width, dim, generator=generator, dtype=torch.float32, device=generator.device) / dim**0.5
        projection = projection.to(self.env.device)
        return {"attn_q": projection.clone(), "attn_k": projection.clone()}

    # ---- client ---------------------------------------------------------
    def train_client(self, job: ClientJob) -> ClientResult:
        env = self.env
        state = dict(job.client_state) if job.client_state else {}
        if not all(key in state for key in MEMORY_KEYS):
            state.update(self.build_memory(job))
        if "attn_q" not in state:
            state.update(self.initial_attention(job.generator))
        global_ctx = job.server_state["ctx"]
        ctx = torch.nn.Parameter(global_ctx.detach().clone().to(env.device, torch.float32))
        attn_q = torch.nn.Parameter(state["attn_q"].detach().clone().float())
        attn_k = torch.nn.Parameter(state["attn_k"].detach().clone().float())
        memory = {"memory_features": state["memory_features"], "memory_labels": state["memory_labels"]}

        def loss_fn(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            module = {**memory, "attn_q": attn_q, "attn_k": attn_k}
            return cross_entropy(self.combined_logits(features, env.text_encoder(ctx), module), labels)

        loss = run_local_epochs(
            job.batches,
            [
                {"params": [ctx], "lr": env.training.lr, "cosine": True},
                {"params": [attn_q, attn_k], "lr": self.options.attention_lr},
            ],
            loss_fn,
            env.training,
            env.clip.encode_images,
        )
        upload = {"ctx": ctx.detach()}
        client_state = {**memory, "attn_q": attn_q.detach(), "attn_k": attn_k.detach()}
        return ClientResult(upload=upload, client_state=client_state, num_examples=job.num_examples, train_loss=loss)

    # ---- server: PromptFL's FedAvg of "ctx" (inherited) -------------------

    # ---- evaluation -----------------------------------------------------
    def evaluator(self, view: RoundView) -> ClientEvaluator:
        with torch.no_grad():
            text = self.env.text_encoder(view.end_state["ctx"].to(self.env.device))
        return PersonalVisualEvaluator(self, text, view.client_states)
