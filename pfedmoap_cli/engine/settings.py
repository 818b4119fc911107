"""Typed training settings and how they are resolved.

Precedence, lowest first: the defaults below, the dataset recipe's
``[train]`` table (``data_recipes/<dataset>.toml``), a TOML config file, and
flags given on the command line. The resolved settings are written into the
run, and (minus the fields that cannot change results, plus the identity of
the backbone's weights) hashed into its id.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from pfedmoap_cli.artifacts.atomic import sha256_json
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.model.backbone import BackboneSpec


@dataclass(frozen=True)
class TrainSettings:
    """Everything that defines a training run (besides its partition)."""

    method: str = "pfedmoap"
    rounds: int = 10
    local_epochs: int = 5
    frac: float = 1.0
    batch_size: int = 32
    seed: int = 1
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    n_ctx: int = 16
    ctx_init: str = ""
    backbone: str = "RN50"
    pretrained: str = "openai"
    backbone_seed: int = 0
    truncate_prompts: bool = True
    device: str = "auto"
    amp: bool = True
    eval_batch_size: int = 256
    num_workers: int = 0
    #: "tensor": training images decoded once and augmented as tensors;
    #: "pil": decoded from file and augmented with PIL at every epoch (the
    #: path of runs made before 0.2; other interpolation, so other numbers).
    image_pipeline: str = "tensor"
    #: The sampled clients of a round train in lock step as one batched
    #: computation (methods that implement it, local engine). Equal to client
    #: by client within float rounding (1e-5 after a round): like ``device``,
    #: how the numbers are computed, not which, so not part of the run id.
    #: A Flower node always trains its one client alone.
    batched: bool = True
    #: Score the clients every N rounds (the last round always).
    eval_every: int = 1
    #: Rounds whose checkpoints stay on disk: "auto" (what resume and the
    #: final round need), "all", or a number N (the last N rounds).
    keep_rounds: str = "auto"
    #: Memory for decoded training images (MiB); the rest spill to the
    #: workspace's image cache on disk.
    image_cache_mb: int = 2048
    method_options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The settings as a JSON-ready dictionary."""
        return dataclasses.asdict(self)


# Fields that change how fast a run goes but not its numbers on a given device.
# ``truncate_prompts`` is NOT among them: EOT truncation is exact in exact
# arithmetic, but a shorter sequence changes the reduction order of attention
# and layer norms, so under fp16/bf16 autocast on a GPU its features differ in
# the last bits and the run's numbers with them.
# Nor is ``eval_batch_size``: FedOTP's transport stops on an error averaged
# over the whole batch (as its authors' solver does), so a test image's score
# depends on the batch it is solved in.
_NOT_IN_RUN_ID = {"device", "batched", "keep_rounds", "image_cache_mb"}
#: Settings recorded by runs made before a field existed take the value that
#: reproduces what those runs did (not the new default).
_BEFORE_FIELD = {"image_pipeline": "pil", "batched": False}
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TrainSettings)}


def _coerce(name: str, value: Any) -> Any:
    kind = _FIELD_TYPES[name]
    try:
        if kind == "int" and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind == "float" and not isinstance(value, bool):
            return float(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
                return value.lower() in {"true", "1", "yes"}
            raise ValueError
        if kind == "str":
            if value is None:
                return ""
            if name == "keep_rounds" and isinstance(value, int) and not isinstance(value, bool):
                return str(value)  # keep_rounds = 3 in a TOML file
            if not isinstance(value, str):
                raise ValueError
            return value
        if name == "method_options":
            if not isinstance(value, Mapping):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"setting '{name}' must be of type {kind}, got {value!r}; fix it in your config file or flags")


def merge_settings(base: TrainSettings, overrides: Mapping[str, Any], source: str) -> TrainSettings:
    """Apply ``overrides`` (from ``source``, for error messages) on top of ``base``.

    ``method_options`` dictionaries are merged key by key; unknown keys are errors.
    """
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        name = key.replace("-", "_")
        if name not in _FIELD_TYPES:
            known = ", ".join(sorted(_FIELD_TYPES))
            raise ConfigError(f"unknown setting '{key}' in {source}; known settings: {known}")
        if value is None:
            continue
        coerced = _coerce(name, value)
        if name == "method_options":
            coerced = {**base.method_options, **changes.get("method_options", {}), **coerced}
        changes[name] = coerced
    return dataclasses.replace(base, **changes)


def _finite(value: float) -> bool:
    """Whether ``value`` is a real number (``--lr inf`` and ``--lr nan`` parse as floats)."""
    return math.isfinite(value)


def validate_settings(settings: TrainSettings) -> TrainSettings:
    """Check value ranges; raise :class:`ConfigError` naming the flag to fix.

    Every float must be finite: ``nan`` compares false with everything, so a
    plain range check alone would let it through. ``momentum`` and
    ``weight_decay`` have no flag, so their messages name the config key.
    """
    checks = [
        (settings.rounds >= 1, "--rounds must be at least 1"),
        (settings.local_epochs >= 1, "--local-epochs must be at least 1"),
        (_finite(settings.frac) and 0.0 < settings.frac <= 1.0, f"--frac must be in (0, 1], got {settings.frac}"),
        (settings.batch_size >= 1, "--batch-size must be at least 1"),
        (_finite(settings.lr) and settings.lr > 0, f"--lr must be a finite number > 0, got {settings.lr}"),
        (
            _finite(settings.momentum) and 0.0 <= settings.momentum < 1.0,
            f"setting 'momentum' must be in [0, 1), got {settings.momentum}; fix it in your --config file",
        ),
        (
            _finite(settings.weight_decay) and settings.weight_decay >= 0.0,
            f"setting 'weight_decay' must be a finite number >= 0, got {settings.weight_decay}; fix it in your --config file",
        ),
        (settings.n_ctx >= 1, "--n-ctx must be at least 1"),
        (settings.seed >= 0, "--seed must be non-negative"),
        (settings.backbone_seed >= 0, "--backbone-seed must be non-negative"),
        (settings.eval_batch_size >= 1, "--eval-batch-size must be at least 1"),
        (settings.num_workers >= 0, "--workers must be 0 or more"),
        (settings.image_pipeline in {"tensor", "pil"}, f"--image-pipeline must be tensor or pil, got {settings.image_pipeline!r}"),
        (settings.eval_every >= 1, "--eval-every must be at least 1"),
        (keep_rounds_count(settings.keep_rounds) != 0, f"--keep-rounds must be auto, all or a number >= 1, got {settings.keep_rounds!r}"),
        (settings.image_cache_mb >= 0, "--image-cache-mb must be 0 or more"),
        (settings.device in {"auto", "cpu", "cuda"} or _cuda_index(settings.device), f"--device must be auto, cpu, cuda or cuda:N, got {settings.device!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return settings


def keep_rounds_count(keep_rounds: str) -> int | None:
    """How many of the last rounds ``--keep-rounds`` keeps: None for "all",
    1 for "auto" (the last complete round: resume and the final round need
    only it), 0 for a value that is none of these."""
    text = str(keep_rounds).strip().lower()
    if text == "all":
        return None
    if text == "auto":
        return 1
    return int(text) if text.isdigit() and int(text) >= 1 else 0


def _cuda_index(device: str) -> bool:
    """Whether ``device`` is ``cuda:N`` with N a non-negative integer."""
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


def phrase_token_count(backbone: str, phrase: str) -> int | None:
    """Number of tokens of a ``--ctx-init`` phrase under ``backbone``'s tokenizer, or None when it cannot tell.

    The phrase is normalised as the prompt encoder does (underscores to
    spaces, runs of blanks to one), so the count is the context length the
    encoder will train. Only the tokenizer is built, not the model.
    """
    from pfedmoap_cli.model import backbone as backbone_module

    text = " ".join(phrase.replace("_", " ").split())
    if not text:
        return None
    open_clip = backbone_module.import_open_clip()
    backbone_module.register_tiny_configs()
    try:
        tokenizer = backbone_module._tokenizer_for(open_clip, backbone, 77)
    except Exception:  # noqa: BLE001 - e.g. a Hugging Face tokenizer offline; loading the backbone reports that properly
        return None
    encode = getattr(tokenizer, "encode", None)
    return len(encode(text)) if callable(encode) else None


def settle_context_length(settings: TrainSettings, n_ctx_given: bool) -> TrainSettings:
    """Make ``n_ctx`` the number of context tokens the run really trains.

    With ``--ctx-init`` the phrase's tokens are the context, whatever
    ``n_ctx`` says. Recording another number would put a wrong ``n_ctx`` in
    run.json and the run id, so the phrase's token count is recorded instead;
    an ``--n-ctx`` the user gave (flag or config file) that disagrees is
    refused rather than silently overridden.
    """
    if not settings.ctx_init.strip():
        return settings
    count = phrase_token_count(settings.backbone, settings.ctx_init)
    if count is None or count == settings.n_ctx:
        return settings
    if count < 1:
        raise ConfigError(f"--ctx-init {settings.ctx_init!r} has no tokens; give a phrase such as 'a photo of a'")
    if n_ctx_given:
        raise ConfigError(
            f"--ctx-init {settings.ctx_init!r} is {count} tokens long but --n-ctx is {settings.n_ctx}; "
            f"drop --n-ctx (the phrase sets the context length) or pass --n-ctx {count}"
        )
    return dataclasses.replace(settings, n_ctx=count)


def backbone_spec(settings: TrainSettings) -> BackboneSpec:
    """The backbone named by the settings ("none" means random initialisation)."""
    pretrained = settings.pretrained if settings.pretrained.lower() not in {"", "none"} else None
    return BackboneSpec(model=settings.backbone, pretrained=pretrained, init_seed=settings.backbone_seed)


def run_fingerprint(settings: TrainSettings, partition_sha256: str) -> str:
    """Hash of everything that determines a run's numbers.

    The weights' identity (the sha256 of shipped weights and of local
    checkpoint files) is part of it: regenerated weights under the same name
    give new run ids, so a run or a table cell is never resumed or counted
    with other weights than it started with.
    """
    payload = {k: v for k, v in settings.to_json().items() if k not in _NOT_IN_RUN_ID}
    return sha256_json({"settings": payload, "partition": partition_sha256, "weights": backbone_spec(settings).identity()})


def default_run_id(settings: TrainSettings, dataset: str, partition_sha256: str) -> str:
    """``<dataset>-<method>-s<seed>-<hash8>``: readable, and unique per configuration."""
    return f"{dataset}-{settings.method}-s{settings.seed}-{run_fingerprint(settings, partition_sha256)[:8]}"


def settings_from_json(data: Mapping[str, Any]) -> TrainSettings:
    """Rebuild settings saved in a run (unknown keys are an error, defaults fill gaps).

    A field the run did not record yet takes the value that reproduces what
    the run did (``_BEFORE_FIELD``), not today's default.
    """
    return merge_settings(TrainSettings(), {**_BEFORE_FIELD, **data}, "run.json")
