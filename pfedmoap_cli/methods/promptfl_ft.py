"""PromptFL+FT: PromptFL whose clients are scored with a locally fine-tuned copy of the global prompt.

Guo et al., "PromptFL: Let Federated Participants Cooperatively Learn Prompts
Instead of Models" (IEEE TMC 2023), with local fine-tuning before evaluation,
the "+FT" baseline of Table 1 (PROTOCOL.md section 6).

The federation is exactly PromptFL: each participant trains the round's global
prompt on its own data and uploads it, the server averages the uploads by
training-set size, and the next round starts from that average. What changes
is evaluation: every client that has trained is scored with its own
*fine-tuned* prompt -- the global prompt it received, trained on its own data
-- and never with the average. The fine-tuned prompt is kept by the client
(``client_state["ft_ctx"]``) and is never uploaded; it never feeds back into
the federation. A client that has not trained yet is scored with the global
prompt; one that sat a round out keeps its last fine-tuned prompt.

Only the hook contract's data access shapes one choice: a client sees data
only during its local update, so the global prompt it fine-tunes is the one it
received this round (the round-start global), not the new average. With the
default ``ft_epochs = 0`` the fine-tuned prompt is the client's local update
itself (E local epochs from the global prompt, PROTOCOL.md section 2).

Options
-------
ft_epochs:
    Extra local epochs (their own cosine schedule) that continue training a
    copy of the uploaded prompt before it is stored as the client's fine-tuned
    prompt; 0 (default) uses the local update itself.

State: server ``{"ctx"}`` (the global prompt); client ``{"ft_ctx"}``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.base import ClientEvaluator, ClientJob, ClientResult, RoundView, register_method
from pfedmoap_cli.methods.coop import PerClientPromptEvaluator, train_prompt
from pfedmoap_cli.methods.promptfl import PromptFL


@dataclass(frozen=True)
class PromptFLFineTuneOptions:
    ft_epochs: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.ft_epochs, bool) or not isinstance(self.ft_epochs, int) or self.ft_epochs < 0:
            raise ConfigError(f"promptfl-ft option ft_epochs must be a non-negative integer, got {self.ft_epochs!r}")


@register_method
class PromptFLFineTune(PromptFL):
    name = "promptfl-ft"
    Options = PromptFLFineTuneOptions

    def __init__(self, env, options=None) -> None:
        super().__init__(env, options or PromptFLFineTuneOptions())

    # ---- client ---------------------------------------------------------
    def train_client(self, job: ClientJob) -> ClientResult:
        global_ctx = job.server_state["ctx"]
        ctx, loss = train_prompt(self, job, global_ctx)  # the federation's local update
        ft_ctx = ctx
        if self.options.ft_epochs > 0:
            ft_ctx, _ = train_prompt(self, job, ctx, epochs=self.options.ft_epochs)
        return ClientResult.exchanged(
            downloaded={"ctx": global_ctx}, upload={"ctx": ctx}, client_state={"ft_ctx": ft_ctx}, num_examples=job.num_examples, train_loss=loss
        )

    # ---- server: PromptFL's FedAvg of "ctx" (inherited) -------------------

    # ---- evaluation -----------------------------------------------------
    def evaluator(self, view: RoundView) -> ClientEvaluator:
        prompts = {cid: state["ft_ctx"] for cid, state in view.client_states.items() if "ft_ctx" in state}
        return PerClientPromptEvaluator(self.env.text_encoder, self.env.logit_scale, prompts, view.end_state["ctx"])
