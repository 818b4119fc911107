"""ZS-CLIP: zero-shot CLIP with a hand-written prompt, no training.

Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision" (ICML 2021). Every client scores its test images against
``"a photo of a {classname}."`` (PROTOCOL.md section 6).

Options: ``template`` -- the prompt, with ``{}`` where the class name goes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pfedmoap_cli.methods.base import ClientEvaluator, FederatedMethod, RoundView, State, register_method
from pfedmoap_cli.methods.local_training import prompt_logits
from pfedmoap_cli.model.prompt import encode_texts


@dataclass(frozen=True)
class ZeroShotOptions:
    template: str = "a photo of a {}."


class SharedTextEvaluator(ClientEvaluator):
    """Every client uses the same text features."""

    def __init__(self, text_features: torch.Tensor, logit_scale: float) -> None:
        self.text_features = text_features
        self.logit_scale = logit_scale

    def logits(self, client_id: int, image_features: torch.Tensor) -> torch.Tensor:
        return prompt_logits(image_features, self.text_features, self.logit_scale)


@register_method
class ZeroShotClip(FederatedMethod):
    name = "zsclip"
    global_part = "the hand-written prompt (nothing is trained)"
    Options = ZeroShotOptions
    trains = False

    def initial_server_state(self, generator: torch.Generator) -> State:
        return {}

    def evaluator(self, view: RoundView) -> ClientEvaluator:
        options = self.options or ZeroShotOptions()
        texts = [options.template.format(name.replace("_", " ")) for name in self.env.class_names]
        return SharedTextEvaluator(encode_texts(self.env.clip, texts), self.env.logit_scale)
