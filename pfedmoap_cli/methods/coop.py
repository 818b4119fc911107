"""CoOp: every client learns its own prompt on its own data, no communication.

Zhou et al., "Learning to Prompt for Vision-Language Models" (IJCV 2022).
The local-only baseline of PROTOCOL.md section 6: all clients start from the
same initial context; a client that has not trained yet is scored with it.

Options: none (prompt length, initialisation and the optimiser are shared
training settings).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from pfedmoap_cli.engine.batched_round import run_local_epochs_batched
from pfedmoap_cli.methods.base import (
    ClientEvaluator,
    ClientJob,
    ClientResult,
    FederatedMethod,
    RoundView,
    State,
    register_method,
)
from pfedmoap_cli.methods.local_training import cross_entropy, prompt_logits, run_local_epochs


class PerClientPromptEvaluator(ClientEvaluator):
    """Scores each client with its own prompt (or a fallback for clients without one)."""

    def __init__(self, text_encoder, logit_scale: float, prompts: dict[int, torch.Tensor], fallback: torch.Tensor) -> None:
        self.text_encoder = text_encoder
        self.logit_scale = logit_scale
        self.prompts = prompts
        self.fallback = fallback
        self._fallback_features: torch.Tensor | None = None

    def logits(self, client_id: int, image_features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if client_id in self.prompts:
                text = self.text_encoder(self.prompts[client_id])
            else:
                if self._fallback_features is None:
                    self._fallback_features = self.text_encoder(self.fallback)
                text = self._fallback_features
        return prompt_logits(image_features, text, self.logit_scale)


def train_prompt(method: FederatedMethod, job: ClientJob, start_ctx: torch.Tensor, extra_loss=None, epochs: int | None = None) -> tuple[torch.Tensor, float]:
    """Train a copy of ``start_ctx`` on the client's data with CoOp's loss.

    ``extra_loss(ctx)`` adds a regulariser (FedProx-style methods). Returns the
    trained context (detached) and the last epoch's mean loss.
    """
    env = method.env
    ctx = torch.nn.Parameter(start_ctx.detach().clone().to(env.device, torch.float32))

    def loss_fn(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = cross_entropy(prompt_logits(features, env.text_encoder(ctx), env.logit_scale), labels)
        return loss + extra_loss(ctx) if extra_loss is not None else loss

    loss = run_local_epochs(
        job.batches, [{"params": [ctx], "lr": env.training.lr, "cosine": True}], loss_fn, env.training, env.clip.encode_images, epochs
    )
    return ctx.detach(), loss


def train_prompts_batched(
    method: FederatedMethod,
    jobs: Sequence[ClientJob],
    start_ctxs: Sequence[torch.Tensor],
    extra_losses: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None,
    epochs: int | None = None,
) -> tuple[list[torch.Tensor], list[float]]:
    """:func:`train_prompt` for every job at once, in lock step (one row of a stacked context per job).

    ``start_ctxs[b]`` and ``extra_losses[b]`` (a regulariser of one context,
    or None) belong to ``jobs[b]``. At each step the text encoder runs once on
    the contexts of the clients that have a batch, ``(P, n_ctx, W) -> (P, C, D)``.
    Returns each job's trained context (detached, its own storage) and last
    epoch's mean loss, in the order of ``jobs``.
    """
    env = method.env
    extras = list(extra_losses) if extra_losses is not None else [None] * len(jobs)
    ctx = torch.nn.Parameter(torch.stack([c.detach().to(env.device, torch.float32) for c in start_ctxs]))

    def loss_fn(positions: list[int], features: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
        active = ctx.index_select(0, torch.tensor(positions, device=ctx.device))
        text = env.text_encoder(active)
        losses = []
        for row, (position, feats, y) in enumerate(zip(positions, features, labels)):
            loss = cross_entropy(prompt_logits(feats, text[row], env.logit_scale), y)
            extra = extras[position]
            losses.append(loss + extra(active[row]) if extra is not None else loss)
        return torch.stack(losses)

    losses = run_local_epochs_batched(
        jobs, [{"params": [ctx], "lr": env.training.lr, "cosine": True}], loss_fn, env.training, env.clip.encode_images, epochs
    )
    # Each context is cloned out of the stack: a view would carry (and checkpoint) every client's rows.
    return [row.clone() for row in ctx.detach()], losses


@register_method
class CoOp(FederatedMethod):
    name = "coop"
    global_part = None
    no_global_part_reason = "each client's prompt is its own and is never shared"

    def initial_server_state(self, generator: torch.Generator) -> State:
        return {"init_ctx": self.env.text_encoder.initial_context(generator)}

    def client_download(self, server_state, client_id: int, round_index: int) -> State:
        """Nothing: CoOp does not communicate; a client starts from :meth:`initial_state` itself."""
        return {}

    def train_client(self, job: ClientJob) -> ClientResult:
        start = job.client_state["ctx"] if job.client_state else self.initial_state()["init_ctx"]
        ctx, loss = train_prompt(self, job, start)
        return ClientResult(upload={}, client_state={"ctx": ctx}, num_examples=job.num_examples, train_loss=loss)

    def train_clients_batched(self, jobs: Sequence[ClientJob]) -> list[ClientResult]:
        """Every client's own prompt trained in lock step (see :func:`train_prompts_batched`)."""
        initial = None
        starts = []
        for job in jobs:
            if job.client_state:
                starts.append(job.client_state["ctx"])
            else:
                initial = initial if initial is not None else self.initial_state()["init_ctx"]
                starts.append(initial)
        ctxs, losses = train_prompts_batched(self, jobs, starts)
        return [
            ClientResult(upload={}, client_state={"ctx": ctx}, num_examples=job.num_examples, train_loss=loss)
            for job, ctx, loss in zip(jobs, ctxs, losses)
        ]

    def evaluator(self, view: RoundView) -> ClientEvaluator:
        prompts = {cid: state["ctx"] for cid, state in view.client_states.items() if "ctx" in state}
        return PerClientPromptEvaluator(self.env.text_encoder, self.env.logit_scale, prompts, view.end_state["init_ctx"])
