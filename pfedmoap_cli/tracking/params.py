"""A run's resolved settings as flat hyperparameters (the same in every tracker)."""

from __future__ import annotations

from typing import Any

from pfedmoap_cli.engine.settings import TrainSettings

Scalar = str | int | float | bool


def _scalar(value: Any) -> Scalar:
    if value is None:
        return "none"
    return value if isinstance(value, (str, int, float, bool)) else str(value)


def hyperparameters(settings: TrainSettings, run_id: str, dataset: str, partition_sha256: str) -> dict[str, Scalar]:
    """``settings`` flattened (``method_options.KEY``), with the run's identity; ``None`` becomes ``"none"``."""
    out: dict[str, Scalar] = {"run_id": run_id, "dataset": dataset, "partition_sha256": partition_sha256}
    for key, value in sorted(settings.to_json().items()):
        if isinstance(value, dict):
            for option, option_value in sorted(value.items()):
                out[f"{key}.{option}"] = _scalar(option_value)
        else:
            out[key] = _scalar(value)
    return out
