"""Base-to-novel scores of a round (PROTOCOL-MORE.md section 6).

A base-to-novel partition trains every client on the base classes (labels
0..m-1, m = ceil(C/2)) only. After each evaluated round every client is also
scored

* on **base**: its own evaluator (the run's method, over the m base names)
  on ALL base test images of the dataset, argmax over the m base classes;
* on **novel**: the evaluator of a second instance of the method built over
  the C-m novel names (same frozen CLIP, settings and options), on the same
  round's states, on ALL novel test images with labels shifted by -m, argmax
  over the novel classes. A CoOp-style context is plugged into the novel
  names' prompts; FedTPG re-conditions its generator on them (its
  ``env.class_names`` are the novel names); pFedMoAP mixes its local prompt
  and experts on them, gated as usual. Methods whose state is tied to the
  training classes (``label_set_free = False``) get no novel scores, and the
  run says why once.

The rows are split ``"base"`` and ``"novel"`` (metrics ``accuracy`` and
``loss``) next to each client's ``"test"`` rows of the same round; "Local" is
the usual test accuracy (each client on its own test images).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Sequence

import torch

from pfedmoap_cli.engine.evaluation import ClientScore, score_client
from pfedmoap_cli.methods.base import ClientEvaluator, FederatedMethod, RoundView
from pfedmoap_cli.model.prompt import PromptTextEncoder

#: The metrics.csv splits of the base-to-novel scores (read by the report and the tables).
BASE_SPLIT = "base"
NOVEL_SPLIT = "novel"
GENERALISATION_SPLITS = (BASE_SPLIT, NOVEL_SPLIT)


def method_for_class_names(source: Any, class_names: Sequence[str]) -> FederatedMethod:
    """The same method (class, options, frozen CLIP, prompt settings, seed) built over ``class_names``.

    Parameters
    ----------
    source:
        A :class:`FederatedMethod` instance, or anything with a ``method``
        attribute holding one (a :class:`~pfedmoap_cli.engine.session.Session`).
    class_names:
        The label set of the new instance, in label order.

    Returns
    -------
    FederatedMethod
        A fresh instance whose ``env.class_names`` and text encoder are
        ``class_names``; its evaluator takes the same states as the original's
        (call it only for methods with :attr:`FederatedMethod.label_set_free`).
    """
    method = source if isinstance(source, FederatedMethod) else source.method
    env = method.env
    encoder = env.text_encoder
    # The prompt settings are the run's: n_ctx (or the --ctx-init phrase) and truncation.
    text_encoder = PromptTextEncoder(
        env.clip, list(class_names), n_ctx=encoder.n_ctx, init_phrase=encoder.init_phrase, truncate=encoder.truncate
    ).to(env.device)
    new_env = dataclasses.replace(env, text_encoder=text_encoder, class_names=tuple(class_names))
    return type(method)(new_env, method.options)


def _say(note: str) -> None:
    print(note, file=sys.stderr, flush=True)


class GeneralisationScorer:
    """Scores every client of a base-to-novel run on all base and all novel test images.

    Built once per run (the novel instance's text encoder and the test-image
    index sets are reused every round). ``say`` receives the one notice line
    of a method that cannot be scored on novel classes.
    """

    def __init__(
        self,
        method: FederatedMethod,
        novel_class_names: Sequence[str],
        test_labels: torch.Tensor,
        batch_size: int,
        say: Callable[[str], None] = _say,
    ) -> None:
        self.method = method
        self.base_classes = len(method.env.class_names)
        self.batch_size = batch_size
        self.base_index = torch.nonzero(test_labels < self.base_classes).flatten()
        self.novel_index = torch.nonzero(test_labels >= self.base_classes).flatten()
        self.base_labels = test_labels[self.base_index]
        self.novel_labels = test_labels[self.novel_index] - self.base_classes  # novel class k is label m + k
        self.novel_method: FederatedMethod | None = None
        if not type(method).label_set_free:
            say(
                f"note: method {type(method).name} keeps state tied to the classes it trained on, so it cannot be scored on "
                "novel class names; this base-to-novel run records base scores only (no 'novel' rows)"
            )
        elif len(self.novel_index) > 0:
            self.novel_method = method_for_class_names(method, novel_class_names)

    def score(
        self, view: RoundView, base_evaluator: ClientEvaluator, test_features: torch.Tensor, client_ids: Sequence[int]
    ) -> dict[str, list[ClientScore]]:
        """``{"base": [...], "novel": [...]}``: every client's score per split (no "novel" key without a novel instance).

        ``base_evaluator`` is the method's evaluator of ``view`` (the one the
        clients' own test sets were scored with).
        """
        scores = {BASE_SPLIT: self._score_all(base_evaluator, test_features[self.base_index], self.base_labels, client_ids)}
        if self.novel_method is not None:
            novel_evaluator = self.novel_method.evaluator(view)
            scores[NOVEL_SPLIT] = self._score_all(novel_evaluator, test_features[self.novel_index], self.novel_labels, client_ids)
        return scores

    def _score_all(self, evaluator: ClientEvaluator, features: torch.Tensor, labels: torch.Tensor, client_ids: Sequence[int]) -> list[ClientScore]:
        if len(labels) == 0:
            return []
        # Diagnostics (extra metrics) belong to the clients' own test sets; only accuracy and loss are kept here.
        return [dataclasses.replace(score_client(evaluator, c, features, labels, self.batch_size), extra={}) for c in client_ids]
