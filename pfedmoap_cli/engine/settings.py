"""Typed training settings and how they are resolved.

Precedence, lowest first: the defaults below, the dataset recipe's
``[train]`` table (``data_recipes/<dataset>.toml``), a TOML config file, and
flags given on the command line. The resolved settings are written into the
run, and (minus the fields that cannot change results, plus the identity of
the backbone's weights) hashed into its id.
"""

from __future__ import annotations

import dataclasses
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
_NOT_IN_RUN_ID = {"device"}
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


def validate_settings(settings: TrainSettings) -> TrainSettings:
    """Check value ranges; raise :class:`ConfigError` naming the flag to fix."""
    checks = [
        (settings.rounds >= 1, "--rounds must be at least 1"),
        (settings.local_epochs >= 1, "--local-epochs must be at least 1"),
        (0.0 < settings.frac <= 1.0, "--frac must be in (0, 1]"),
        (settings.batch_size >= 1, "--batch-size must be at least 1"),
        (settings.lr > 0, "--lr must be positive"),
        (settings.n_ctx >= 1, "--n-ctx must be at least 1"),
        (settings.seed >= 0, "--seed must be non-negative"),
        (settings.eval_batch_size >= 1, "--eval-batch-size must be at least 1"),
        (settings.num_workers >= 0, "--workers must be 0 or more"),
        (settings.device in {"auto", "cpu", "cuda"} or settings.device.startswith("cuda:"), "--device must be auto, cpu or cuda"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return settings


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
    """Rebuild settings saved in a run (unknown keys are an error, defaults fill gaps)."""
    return merge_settings(TrainSettings(), data, "run.json")
