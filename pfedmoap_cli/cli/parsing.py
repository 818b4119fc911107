"""Small parsers shared by subcommands."""

from __future__ import annotations

from typing import Any

from pfedmoap_cli.errors import ConfigError


def parse_scalar(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"`` -> True, anything else stays a string."""
    lowered = text.lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_key_values(items: list[str], flag: str) -> dict[str, Any]:
    """Parse repeated ``KEY=VALUE`` flags into a dict with typed scalars."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        parsed[key.strip().replace("-", "_")] = parse_scalar(value.strip())
    return parsed
