"""PromptFL: federated averaging of a CoOp prompt.

Guo et al., "PromptFL: Let Federated Participants Cooperatively Learn Prompts
Instead of Models" (IEEE TMC 2023). Each round the sampled clients train the
global context locally; the server averages them weighted by training-set
size; every client is scored with the global prompt (PROTOCOL.md section 6).

Options: none.
"""

from __future__ import annotations

from typing import Mapping, Sequence

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
from pfedmoap_cli.methods.coop import train_prompt, train_prompts_batched
from pfedmoap_cli.methods.local_training import weighted_average
from pfedmoap_cli.methods.zsclip import SharedTextEvaluator


@register_method
class PromptFL(FederatedMethod):
    name = "promptfl"

    def initial_server_state(self, generator: torch.Generator) -> State:
        return {"ctx": self.env.text_encoder.initial_context(generator)}

    def train_client(self, job: ClientJob) -> ClientResult:
        ctx, loss = train_prompt(self, job, job.server_state["ctx"])
        return ClientResult(upload={"ctx": ctx}, client_state={}, num_examples=job.num_examples, train_loss=loss)

    def train_clients_batched(self, jobs: Sequence[ClientJob]) -> list[ClientResult]:
        """Every participant's copy of the global context trained in lock step."""
        ctxs, losses = train_prompts_batched(self, jobs, [job.server_state["ctx"] for job in jobs])
        return [
            ClientResult(upload={"ctx": ctx}, client_state={}, num_examples=job.num_examples, train_loss=loss)
            for job, ctx, loss in zip(jobs, ctxs, losses)
        ]

    def aggregate(self, start_state: Mapping[str, torch.Tensor], results: Mapping[int, ClientResult], round_index: int) -> State:
        if not results:
            return dict(start_state)
        order = sorted(results)  # a fixed order keeps the float sum independent of scheduling
        ctx = weighted_average([results[c].upload["ctx"] for c in order], [results[c].num_examples for c in order])
        return {"ctx": ctx}

    def evaluator(self, view: RoundView) -> ClientEvaluator:
        with torch.no_grad():
            text = self.env.text_encoder(view.end_state["ctx"].to(self.env.device))
        return SharedTextEvaluator(text, self.env.logit_scale)
