"""LocalAvg: an example method plug-in for pfedmoap (not a method from a paper).

Each client keeps its own prompt. In a round it starts from a mix of the
global prompt and its own, ``mix * own + (1 - mix) * global``, trains it with
CoOp's loss, keeps it, and uploads it; the server averages the uploads
weighted by training-set size (FedAvg). A client is scored with its own prompt
once it has trained, with the global prompt before.

Options: ``mix`` in [0, 1] (default 0.5; 0 is PromptFL's start, 1 CoOp's).
"""

from __future__ import annotations

from dataclasses import dataclass

from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.base import ClientResult, FederatedMethod
from pfedmoap_cli.methods.coop import PerClientPromptEvaluator, train_prompt
from pfedmoap_cli.methods.local_training import weighted_average


@dataclass(frozen=True)
class LocalAvgOptions:
    mix: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.mix) <= 1.0:
            raise ConfigError(f"localavg: --method-option mix must be in [0, 1], got {self.mix}")


class LocalAvg(FederatedMethod):
    name = "localavg"
    Options = LocalAvgOptions

    def initial_server_state(self, generator):
        return {"ctx": self.env.text_encoder.initial_context(generator)}

    def train_client(self, job):
        start = job.server_state["ctx"]
        if job.client_state:  # mix in the client's own prompt (a new tensor: the download is not mutated)
            start = self.options.mix * job.client_state["ctx"] + (1 - self.options.mix) * start
        ctx, loss = train_prompt(self, job, start)
        return ClientResult(upload={"ctx": ctx}, client_state={"ctx": ctx}, num_examples=job.num_examples, train_loss=loss)

    def aggregate(self, start_state, results, round_index):
        if not results:
            return dict(start_state)
        order = sorted(results)  # a fixed order: the float sum does not depend on scheduling
        return {"ctx": weighted_average([results[c].upload["ctx"] for c in order], [results[c].num_examples for c in order])}

    def evaluator(self, view):
        own = {c: state["ctx"] for c, state in view.client_states.items() if "ctx" in state}
        return PerClientPromptEvaluator(self.env.text_encoder, self.env.logit_scale, own, view.end_state["ctx"])
