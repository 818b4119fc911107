"""PromptFL+FT: PromptFL whose clients are scored with a locally fine-tuned copy of the global prompt.

Guo et al., "PromptFL: Let Federated Participants Cooperatively Learn Prompts
Instead of Models" (IEEE TMC 2023), with local fine-tuning before evaluation,
the "+FT" baseline of Table 1 (PROTOCOL.md section 6: "PromptFL, then each
client fine-tunes the global prompt on its own data before evaluation (the
federation keeps training the global one)").

The federation is exactly PromptFL: each participant trains the round's global
prompt on its own data and uploads it, the server averages the uploads by
training-set size, and the next round starts from that average. After the
aggregation, EVERY client -- participant or not, trained before or not --
fine-tunes a copy of the NEW global prompt on its own data with a fresh
optimiser (the shared SGD settings, a cosine schedule over the fine-tuning
epochs) and is scored with it. The fine-tuned prompt stays on the client
(``client_state["ft_ctx"]``, checkpointed), is never uploaded and never feeds
back into the federation; the next round's fine-tuning starts again from that
round's global prompt, so no client is ever scored with a stale prompt.

Cost: each round adds N fine-tunings (every client, not only the sampled
ones), which for Table 2 (N = 100, 10% participation) is about ten times the
federation's own training.

Options
-------
ft_epochs:
    Fine-tuning epochs; default: the run's local epochs (``--local-epochs``).

State: server ``{"ctx"}`` (the global prompt); client ``{"ft_ctx"}``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.base import ClientEvaluator, ClientJob, RoundView, State, register_method
from pfedmoap_cli.methods.coop import PerClientPromptEvaluator, train_prompt
from pfedmoap_cli.methods.promptfl import PromptFL


@dataclass(frozen=True)
class PromptFLFineTuneOptions:
    ft_epochs: int | None = None

    def __post_init__(self) -> None:
        value = self.ft_epochs
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(
                f"promptfl-ft option ft_epochs must be a positive integer, got {value!r}; pass --method-option ft_epochs=5 "
                "(or leave it out to use --local-epochs)"
            )


@register_method
class PromptFLFineTune(PromptFL):
    name = "promptfl-ft"
    global_part = "the global prompt (before each client's private fine-tuning)"
    Options = PromptFLFineTuneOptions
    personalizes = True

    def __init__(self, env, options=None) -> None:
        super().__init__(env, options or PromptFLFineTuneOptions())

    # ---- client: PromptFL's local update (inherited) ----------------------
    # ---- server: PromptFL's FedAvg of "ctx" (inherited) -------------------

    # ---- after aggregation: every client fine-tunes the new global prompt ---
    def personalize_client(self, job: ClientJob) -> State:
        """A copy of the new global prompt (``job.server_state``) fine-tuned on the client's data."""
        ft_ctx, _ = train_prompt(self, job, job.server_state["ctx"], epochs=self.options.ft_epochs)
        return {"ft_ctx": ft_ctx}

    # ---- evaluation -----------------------------------------------------
    def evaluator(self, view: RoundView) -> ClientEvaluator:
        prompts = {cid: state["ft_ctx"] for cid, state in view.client_states.items() if "ft_ctx" in state}
        return PerClientPromptEvaluator(self.env.text_encoder, self.env.logit_scale, prompts, view.end_state["ctx"])
