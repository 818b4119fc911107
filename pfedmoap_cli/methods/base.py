"""The contract between the engine and a federated method.

The engine owns loops, devices, seeds, files and metrics; a method owns its
maths and the tensors of its server and client state. A method is a handful
of hooks:

* :meth:`FederatedMethod.initial_server_state` -- the state before round 0;
* :meth:`FederatedMethod.train_client` -- one client's local update in a round.
  It reads only the round-start server snapshot and the client's own state,
  so clients of a round may run in any order (or in parallel);
* :meth:`FederatedMethod.aggregate` -- the server update from this round's results;
* :meth:`FederatedMethod.personalize_client` -- optional: after aggregation, a
  client's personal state built on its own data from the NEW server state
  (PromptFL+FT's fine-tuning), for every client, participant or not;
* :meth:`FederatedMethod.evaluator` -- how every client is scored after the round.

State is plain ``dict[str, torch.Tensor]`` so the engine can checkpoint it
without knowing what it means.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch

from pfedmoap_cli.model.backbone import FrozenClip
from pfedmoap_cli.model.prompt import PromptTextEncoder

State = dict[str, torch.Tensor]
Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class LocalTraining:
    """Optimiser settings shared by every prompt-learning method (PROTOCOL.md section 2)."""

    local_epochs: int = 5
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class MethodEnv:
    """What a method may use: the frozen model, the prompt encoder and its settings.

    Methods never see paths or command-line options.
    """

    clip: FrozenClip
    text_encoder: PromptTextEncoder
    class_names: tuple[str, ...]
    num_clients: int
    training: LocalTraining
    seed: int
    device: torch.device

    @property
    def logit_scale(self) -> float:
        return self.clip.logit_scale


@dataclass
class ClientJob:
    """Everything one client needs for its local update in one round.

    Attributes
    ----------
    batches:
        One shuffled, augmented epoch of the client's training images per call
        (the training transform), seeded per (seed, round, client).
    plain_batches:
        The client's training images under the deterministic TEST transform,
        in a fixed order, without shuffling or augmentation: for methods that
        keep frozen features of their own data (pFedPrompt's memory). Calling
        it draws nothing from any random stream, so the training data order
        does not depend on whether a method uses it.
    """

    client_id: int
    round_index: int
    server_state: Mapping[str, torch.Tensor]
    client_state: State | None
    batches: Batches
    num_examples: int
    generator: torch.Generator
    plain_batches: Batches | None = None


@dataclass
class ClientResult:
    """What a client's local update produced."""

    upload: State
    client_state: State
    num_examples: int
    train_loss: float
    bytes_down: int = 0
    bytes_up: int = 0

    @classmethod
    def exchanged(
        cls, *, downloaded: Mapping[str, torch.Tensor], upload: State, client_state: State, num_examples: int, train_loss: float
    ) -> "ClientResult":
        """A result whose traffic is the tensors ``downloaded`` and ``upload``."""
        return cls(upload, client_state, num_examples, train_loss, tensor_bytes(downloaded), tensor_bytes(upload))


@dataclass(frozen=True)
class RoundView:
    """The state of the federation after a round, as evaluation sees it."""

    round_index: int
    participants: frozenset[int]
    start_state: Mapping[str, torch.Tensor]
    end_state: Mapping[str, torch.Tensor]
    client_states: Mapping[int, State]


class ClientEvaluator(ABC):
    """Scores clients' test features after a round."""

    @abstractmethod
    def logits(self, client_id: int, image_features: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) over all classes for a client's normalised image features (B, D)."""

    def extra_metrics(self, client_id: int, image_features: torch.Tensor) -> dict[str, float]:
        """Optional per-client diagnostics recorded next to accuracy (none by default)."""
        return {}


class FederatedMethod(ABC):
    """Base class of every method; subclasses register with :func:`register_method`."""

    name: ClassVar[str]
    Options: ClassVar[type] = type(None)
    #: False for methods that never train (the engine then skips local updates).
    trains: ClassVar[bool] = True
    #: True for methods that implement :meth:`personalize_client`; the engine then
    #: calls it for every client after each round's aggregation.
    personalizes: ClassVar[bool] = False
    #: True for methods whose evaluators score test images from their local tokens
    #: ``(B, 1 + M, D)`` (:func:`pfedmoap_cli.model.local_tokens.encode_image_tokens`)
    #: instead of pooled features ``(B, D)``; the engine computes and caches those.
    needs_local_tokens: ClassVar[bool] = False

    def __init__(self, env: MethodEnv, options: Any = None) -> None:
        self.env = env
        self.options = options

    @abstractmethod
    def initial_server_state(self, generator: torch.Generator) -> State:
        """Server state before round 0 (for example the initial global prompt)."""

    def prepare_round(self, round_index: int, start_state: Mapping[str, torch.Tensor], participants: tuple[int, ...]) -> None:
        """Called once before a round's local updates (for work shared by its clients).

        The default does nothing. Whatever is prepared here must depend only on
        the round-start state, so that client updates stay order-independent.
        """

    def train_client(self, job: ClientJob) -> ClientResult:
        """One client's local update; must not mutate ``job.server_state``."""
        raise NotImplementedError(f"method {self.name} does not train")

    def aggregate(self, start_state: Mapping[str, torch.Tensor], results: Mapping[int, ClientResult], round_index: int) -> State:
        """New server state from the round-start state and this round's results."""
        return dict(start_state)

    def personalize_client(self, job: ClientJob) -> State:
        """A client's new personal state, trained on its own data after aggregation.

        Called (only when :attr:`personalizes` is True) for EVERY client of the
        federation after the round's aggregation, with ``job.server_state`` the
        NEW server state and ``job.client_state`` the client's state after the
        round's local updates. The returned state replaces the client's state
        (it is checkpointed and passed to :meth:`evaluator`). Must not mutate
        ``job.server_state``; runs with its own seeds (order-independent).
        """
        raise NotImplementedError(f"method {self.name} does not personalise after aggregation")

    @abstractmethod
    def evaluator(self, view: RoundView) -> ClientEvaluator:
        """An evaluator for the federation as it stands after ``view.round_index``."""


_REGISTRY: dict[str, type[FederatedMethod]] = {}


def register_method(cls: type[FederatedMethod]) -> type[FederatedMethod]:
    """Class decorator: make a method available by its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Names of every registered method, sorted."""
    from pfedmoap_cli import methods  # noqa: F401  (imports register the methods)

    return sorted(_REGISTRY)


def get_method(name: str) -> type[FederatedMethod]:
    """The method class registered as ``name``."""
    from pfedmoap_cli.errors import ConfigError

    names = method_names()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method '{name}'; choose one of: {', '.join(names)}")
    return _REGISTRY[name]


def tensor_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes needed to send ``state`` (its tensors' payload sizes)."""
    return int(sum(t.numel() * t.element_size() for t in state.values()))
