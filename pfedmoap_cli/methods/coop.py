"""CoOp: every client learns its own prompt on its own data, no communication.

Zhou et al., "Learning to Prompt for Vision-Language Models" (IJCV 2022).
The local-only baseline of PROTOCOL.md section 6: all clients start from the
same initial context; a client that has not trained yet is scored with it.

Options: none (prompt length, initialisation and the optimiser are shared
training settings).
"""

from __future__ import annotations

import torch

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


@register_method
class CoOp(FederatedMethod):
    name = "coop"

    def initial_server_state(self, generator: torch.Generator) -> State:
        return {"init_ctx": self.env.text_encoder.initial_context(generator)}

    def client_download(self, server_state, client_id: int, round_index: int) -> State:
        """Nothing: CoOp does not communicate; a client starts from :meth:`initial_state` itself."""
        return {}

    def train_client(self, job: ClientJob) -> ClientResult:
        start = job.client_state["ctx"] if job.client_state else self.initial_state()["init_ctx"]
        ctx, loss = train_prompt(self, job, start)
        return ClientResult(upload={}, client_state={"ctx": ctx}, num_examples=job.num_examples, train_loss=loss)

    def evaluator(self, view: RoundView) -> ClientEvaluator:
        prompts = {cid: state["ctx"] for cid, state in view.client_states.items() if "ctx" in state}
        return PerClientPromptEvaluator(self.env.text_encoder, self.env.logit_scale, prompts, view.end_state["init_ctx"])
