"""The ``--report-to`` choices: parsing, the extra each needs, and lazy construction."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Iterable

from pfedmoap_cli.errors import ConfigError


@dataclass(frozen=True)
class TrackerSpec:
    module: str  # pfedmoap_cli.tracking.<module>
    cls: str
    extra: str  # pip install 'pfedmoap[<extra>]'
    requires: str  # the import that must succeed


TRACKERS: dict[str, TrackerSpec] = {
    "tensorboard": TrackerSpec("tensorboard", "TensorBoardTracker", "tensorboard", "torch.utils.tensorboard"),
    "mlflow": TrackerSpec("mlflow", "MlflowTracker", "mlflow", "mlflow"),
    "wandb": TrackerSpec("wandb", "WandbTracker", "wandb", "wandb"),
}


def parse_report_to(values: Iterable[str] | None) -> tuple[str, ...]:
    """Tracker names from ``--report-to`` values (repeatable, each a comma list), in order, without repeats."""
    names: list[str] = []
    for value in values or ():
        for part in str(value).split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in TRACKERS:
                raise ConfigError(f"--report-to {part.strip()!r} is not a tracker; use {', '.join(TRACKERS)} (repeatable or comma-separated)")
            if name not in names:
                names.append(name)
    return tuple(names)


def require(name: str) -> None:
    """Import the library of tracker ``name``; a missing one is a one-line :class:`ConfigError` naming the extra."""
    spec = TRACKERS[name]
    try:
        importlib.import_module(spec.requires)
    except ImportError:
        raise ConfigError(f"--report-to {name} needs the {spec.extra} extra: pip install 'pfedmoap[{spec.extra}]'") from None


def make_trackers(values: Iterable[str] | None) -> list:
    """The trackers of ``--report-to`` (each library checked now, before any run file is written)."""
    trackers = []
    for name in parse_report_to(values):
        require(name)
        spec = TRACKERS[name]
        module = importlib.import_module(f"pfedmoap_cli.tracking.{spec.module}")
        trackers.append(getattr(module, spec.cls)())
    return trackers
