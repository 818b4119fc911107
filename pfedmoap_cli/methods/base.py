"""The contract between the engine and a federated method.

The engine owns loops, devices, seeds, files and metrics; a method owns its
maths and the tensors of its server and client state. A method is a handful
of hooks:

* :meth:`FederatedMethod.initial_server_state` -- the state before round 0;
* :meth:`FederatedMethod.client_download` -- what the server sends one client
  for its local update (its own payload: pFedMoAP sends exactly the client's
  experts). Its tensors are the round's ``bytes_down``;
* :meth:`FederatedMethod.train_client` -- one client's local update in a round.
  It reads only its download and the client's own state, so clients of a
  round may run in any order, in parallel, or on other machines;
* :meth:`FederatedMethod.train_clients_batched` -- optional: the same updates
  for all of a round's participants at once, in lock step (one batched
  computation, equal to client by client within float rounding);
* :meth:`FederatedMethod.aggregate` -- the server update from this round's results;
* :meth:`FederatedMethod.personalize_client` -- optional: after aggregation, a
  client's personal state built on its own data from the NEW server state
  (PromptFL+FT's fine-tuning), for every client, participant or not;
* :meth:`FederatedMethod.evaluator` -- how every client is scored after the round;
* :meth:`FederatedMethod.evaluation_download` and
  :meth:`FederatedMethod.node_evaluator` -- the same scoring split in two, for
  runtimes that score a client where its state lives (a Flower SuperNode).

State is plain ``dict[str, torch.Tensor]`` so the engine can checkpoint it
without knowing what it means.

Methods are found by name in a registry: the built-in ones register with
:func:`register_method` when :mod:`pfedmoap_cli.methods` is imported, and
third-party packages add theirs through the entry-point group
``pfedmoap.methods`` (each entry point a :class:`FederatedMethod` subclass
whose ``name`` is the entry point's, or a module that registers it), loaded
once, the first time the registry is read. A plug-in that cannot be loaded is
refused with a one-line reason and leaves every other method usable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch

from pfedmoap_cli.model.backbone import FrozenClip
from pfedmoap_cli.model.prompt import PromptTextEncoder
from pfedmoap_cli.seeding import torch_generator

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
    server_state:
        What the server sent this client for this round: the method's
        :meth:`FederatedMethod.client_download` of the round-start state.
    batches:
        One shuffled, augmented epoch of the client's training images per call
        (the training transform), seeded per (seed, round, client). Its random
        draws come from the job's own streams, carried from epoch to epoch, so
        several jobs' batches may be interleaved (lock-step rounds) without
        changing any of them.
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
    """What a client's local update produced.

    ``bytes_down`` and ``bytes_up`` are filled in by the runtime from the
    tensors it actually sent (the client's download) and received (``upload``).
    """

    upload: State
    client_state: State
    num_examples: int
    train_loss: float
    bytes_down: int = 0
    bytes_up: int = 0


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
    #: True when neither the method's state nor its evaluator depends on the class
    #: set it was trained on (a CoOp-style context works with any class names), so a
    #: second instance built over other class names (:func:`pfedmoap_cli.engine.
    #: generalisation.method_for_class_names`) can score the same round's states on
    #: them: the novel classes of a base-to-novel run. False for methods whose state
    #: is tied to the training classes' count or identities (pFedPrompt's memory of
    #: labelled features); those record no novel scores.
    label_set_free: ClassVar[bool] = True
    #: What of a run is scored on another dataset (``pfedmoap evaluate --dataset``), in
    #: words: the evaluator of a client without state on the round's server state.
    #: None: nothing global transfers (:attr:`no_global_part_reason` says why).
    global_part: ClassVar[str | None] = "the global prompt"
    no_global_part_reason: ClassVar[str] = ""

    def __init__(self, env: MethodEnv, options: Any = None) -> None:
        self.env = env
        self.options = options

    @abstractmethod
    def initial_server_state(self, generator: torch.Generator) -> State:
        """Server state before round 0 (for example the initial global prompt)."""

    def initial_state(self) -> State:
        """The run's server state before round 0, on the method's device.

        Seeded by the experiment seed alone (the "init" stream), so every party
        of a federation can rebuild it: a client starts its personal state from
        it without the server sending it.
        """
        state = self.initial_server_state(torch_generator(self.env.seed, "init"))
        return {k: v.to(self.env.device) for k, v in state.items()}

    def client_download(self, server_state: Mapping[str, torch.Tensor], client_id: int, round_index: int) -> State:
        """What the server sends ``client_id`` for its local update in ``round_index``.

        Computed on the server from the round-start state; it becomes
        ``job.server_state`` and its tensors are the client's ``bytes_down``.
        The default sends the whole server state; methods whose server keeps
        per-client data (a pool of prompts) send each client only its share.
        """
        return dict(server_state)

    def prepare_round(self, round_index: int, start_state: Mapping[str, torch.Tensor], participants: tuple[int, ...]) -> None:
        """Called once before a round's local updates (for work shared by its clients).

        The default does nothing. Whatever is prepared here must depend only on
        the round-start state, so that client updates stay order-independent.
        """

    def train_client(self, job: ClientJob) -> ClientResult:
        """One client's local update; must not mutate ``job.server_state``."""
        raise NotImplementedError(f"method {self.name} does not train")

    def train_clients_batched(self, jobs: Sequence[ClientJob]) -> list[ClientResult] | None:
        """Train every job in lock step; results in the order of ``jobs``, equal to
        ``[self.train_client(j) for j in jobs]`` within float rounding. None: this
        method has no batched path (the engine then trains client by client).

        Implementations stack the clients' trainable tensors (one row per job)
        and train them with
        :func:`pfedmoap_cli.engine.batched_round.run_local_epochs_batched`.
        """
        return None

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

    def evaluation_download(self, view: RoundView, client_id: int) -> State:
        """What the server sends ``client_id`` so the client can be scored where its state is.

        Computed from the server's side of ``view`` only (``view.client_states``
        is not used: the server does not hold them). The default sends the
        end-of-round server state. It is also the server state that
        :meth:`personalize_client` starts from on a node.
        """
        return dict(view.end_state)

    def node_evaluator(self, round_index: int, client_id: int, download: Mapping[str, torch.Tensor], client_state: State | None) -> ClientEvaluator:
        """An evaluator for one client that knows only its own state and its evaluation download.

        The default builds the view such a client sees: the download as the
        server state and its own state as the only client state. Methods whose
        evaluators read more of the view override it.
        """
        states = {client_id: client_state} if client_state else {}
        return self.evaluator(RoundView(round_index, frozenset(), dict(download), dict(download), states))


_REGISTRY: dict[str, type[FederatedMethod]] = {}

#: The entry-point group third-party packages declare their methods in
#: (``[project.entry-points."pfedmoap.methods"]`` in their pyproject.toml).
ENTRY_POINT_GROUP = "pfedmoap.methods"
#: Names of the methods shipped with pfedmoap (filled when the registry is first read).
_BUILTIN: set[str] = set()
#: Entry-point name -> why that plug-in was refused (one line naming it and its package).
_PLUGIN_PROBLEMS: dict[str, str] = {}
_plugins_loaded = False


def register_method(cls: type[FederatedMethod]) -> type[FederatedMethod]:
    """Class decorator: make a method available by its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        first = _REGISTRY[cls.name]
        raise ValueError(f"method name {cls.name!r} registered twice ({first.__module__}.{first.__qualname__} and {cls.__module__}.{cls.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def _describe(entry_point: Any) -> str:
    """``entry point 'NAME = module:attr' of package DIST VERSION`` for messages."""
    dist = getattr(entry_point, "dist", None)
    package = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "an unknown package"
    return f"entry point '{entry_point.name} = {entry_point.value}' (group {ENTRY_POINT_GROUP}) of package {package}"


def _load_plugin(entry_point: Any) -> None:
    """Import one entry point and register its method; raises ValueError/ImportError/... when it cannot."""
    import inspect

    before = set(_REGISTRY)
    loaded = entry_point.load()
    if inspect.isclass(loaded):
        if not issubclass(loaded, FederatedMethod):
            raise TypeError(f"{loaded.__qualname__} is not a FederatedMethod subclass")
        name = getattr(loaded, "name", None)
        if name != entry_point.name:
            raise ValueError(f"the method's name is {name!r}; the entry point must have the same name")
        if name in _BUILTIN and _REGISTRY.get(name) is not loaded:
            raise ValueError(f"{name!r} is a built-in method's name; rename the plug-in")
        register_method(loaded)
    elif inspect.ismodule(loaded):
        # A module registers its methods with @register_method when imported
        # (which refuses a built-in's name); the entry point names one of them.
        if entry_point.name not in _REGISTRY or entry_point.name in before:
            raise ValueError(f"module {loaded.__name__} registered no method named {entry_point.name!r}")
    else:
        raise TypeError(f"it names {type(loaded).__name__} {loaded!r}, not a FederatedMethod subclass or a module registering one")


def _load_registry() -> None:
    """Register the built-in methods, then (once per process) the plug-ins of :data:`ENTRY_POINT_GROUP`.

    A plug-in that fails to import, is not a method, or takes a built-in's name
    is refused and remembered with a one-line reason (:func:`plugin_problems`);
    the other methods are unaffected.
    """
    global _plugins_loaded
    from pfedmoap_cli import methods  # noqa: F401  (imports register the built-in methods)

    if _plugins_loaded:
        return
    _plugins_loaded = True
    _BUILTIN.update(_REGISTRY)
    from importlib.metadata import entry_points

    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        if entry_point.name in _REGISTRY and entry_point.name not in _BUILTIN:
            continue  # the same plug-in seen twice on sys.path
        before = dict(_REGISTRY)
        try:
            _load_plugin(entry_point)
        except Exception as error:  # noqa: BLE001 -- any failure of third-party code refuses that plug-in only
            _REGISTRY.clear()
            _REGISTRY.update(before)  # nothing half-registered stays behind
            reason = f"{type(error).__name__}: {error}".replace("\n", " ")
            _PLUGIN_PROBLEMS[entry_point.name] = f"method plug-in {_describe(entry_point)} was refused: {reason}"


def plugin_problems() -> dict[str, str]:
    """Entry-point name -> one-line reason, for each method plug-in that could not be registered."""
    _load_registry()
    return dict(_PLUGIN_PROBLEMS)


def method_names() -> list[str]:
    """Names of every registered method (built-in and plug-in), sorted."""
    _load_registry()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[FederatedMethod]:
    """The method class registered as ``name`` (a :class:`ConfigError` names a broken plug-in of that name)."""
    from pfedmoap_cli.errors import ConfigError

    names = method_names()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _PLUGIN_PROBLEMS:
        raise ConfigError(_PLUGIN_PROBLEMS[name])
    raise ConfigError(f"unknown method '{name}'; choose one of: {', '.join(names)}")


def tensor_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes needed to send ``state`` (its tensors' payload sizes)."""
    return int(sum(t.numel() * t.element_size() for t in state.values()))
