"""Cross-dataset evaluation: a finished run's global part, scored on every class of another dataset.

PROTOCOL-MORE.md section 6: train on one dataset's clients, then classify
all test images of another dataset among all of its classes with what the
federation shares. Private state does not travel: the run is scored as a
client that never trained would receive it (the method's evaluator on the
round's server state with no client state), which is

* the global prompt (or generator, or context and meta-net) for methods whose
  model is global (PromptFL, FedProx, FedKgCoOp, FedTPG, FedCoCoOp, and
  PromptFL+FT before its private fine-tuning);
* the global part with the INITIAL private part every new client starts from
  for methods that add a private part to a global one (FedPer's personal
  tokens, PromptFolio's local prompt, FedPGP's U V, FedOTP's local prompt):
  the report says so;
* nothing for methods without a global part (CoOp), or whose state is bound to
  the classes it was trained on: those are refused with the reason.

The target dataset's class names replace the run's in the prompt learner (a
CoOp-style context is independent of the label set; FedTPG's generator is
re-conditioned on the new names); its test features come from the shared
feature cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pfedmoap_cli.artifacts.partition import Partition
from pfedmoap_cli.data.sources import open_dataset
from pfedmoap_cli.engine.evaluation import score_client
from pfedmoap_cli.engine.generalisation import method_for_class_names
from pfedmoap_cli.engine.session import build_method
from pfedmoap_cli.engine.settings import TrainSettings
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.base import FederatedMethod, RoundView, State, get_method
from pfedmoap_cli.model.features import cached_image_features

#: The client id the "new client" is scored as (no client has a state in the view, so every id falls back alike).
NEW_CLIENT = 0


@dataclass(frozen=True)
class CrossDatasetScore:
    """One run's global part on another dataset."""

    run_id: str
    round: int
    dataset: str
    num_classes: int
    num_examples: int
    accuracy: float
    loss: float
    #: What was scored, in words ("the global prompt", ...), for the report.
    part: str


def transferable_part(method_cls: type[FederatedMethod]) -> str:
    """What of a run of ``method_cls`` is scored on another dataset, in words; ConfigError when nothing is."""
    part = method_cls.global_part
    if part is None:
        raise ConfigError(
            f"method {method_cls.name} has no global part to score on another dataset "
            f"({method_cls.no_global_part_reason or 'its state is private to each client'}); choose a run of a method with a global prompt"
        )
    return part


def score_on_dataset(
    run_id: str,
    settings: TrainSettings,
    partition: Partition,
    round_index: int,
    server_state: State,
    dataset: str,
    dataset_options: dict[str, Any],
    data_root: Path,
    features_cache: Path,
    device: torch.device | None = None,
    progress: bool = True,
) -> CrossDatasetScore:
    """Score ``server_state`` (a complete round of run ``run_id``) on every test image and class of ``dataset``."""
    method_cls = get_method(settings.method)
    part = transferable_part(method_cls)
    source = open_dataset(dataset, Path(data_root), **dataset_options)
    samples = source.samples("test")
    if not samples:
        raise ConfigError(f"dataset {dataset} has no test images under {data_root}; download it with 'pfedmoap download --dataset {dataset}'")
    clip, trained = build_method(settings, partition, device)
    method = method_for_class_names(trained, list(source.class_names))
    features = cached_image_features(
        clip,
        lambda i: source.load_image(samples[i]),
        [s.key for s in samples],
        source.fingerprint(),
        features_cache,
        batch_size=settings.eval_batch_size,
        num_workers=settings.num_workers,
        progress=progress,
        desc=f"{dataset} test features",
        tokens=method_cls.needs_local_tokens,
    ).to(clip.device)
    labels = torch.tensor([s.label for s in samples], dtype=torch.long, device=clip.device)
    state = {k: v.to(clip.device) for k, v in server_state.items()}
    view = RoundView(round_index, frozenset(), state, state, {})  # no client state: private parts stay home
    score = score_client(method.evaluator(view), NEW_CLIENT, features, labels, settings.eval_batch_size)
    return CrossDatasetScore(run_id, round_index, dataset, len(source.class_names), score.num_examples, score.accuracy, score.loss, part)
