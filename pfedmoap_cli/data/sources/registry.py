"""Name -> dataset-source class registry, filled by the ``@register_dataset`` decorator.

As in timm, tests loop over this registry, so a new source is covered by the
generic tests without new test code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.data.sources.base import DatasetSource

_REGISTRY: dict[str, type[DatasetSource]] = {}

SourceT = TypeVar("SourceT", bound=type[DatasetSource])


def register_dataset(cls: SourceT) -> SourceT:
    """Class decorator: register a :class:`DatasetSource` subclass under ``cls.name``.

    Raises
    ------
    ValueError
        If the name is missing or already taken (a programming error, not a user one).
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__} needs a non-empty class attribute 'name'")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"dataset name {name!r} already registered by {existing.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def dataset_names() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_REGISTRY)


def dataset_class(name: str) -> type[DatasetSource]:
    """The source class registered under ``name``.

    Raises
    ------
    ConfigError
        If no source has that name; the message lists the valid ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}"
        ) from None


def open_dataset(name: str, root: Path, **options: Any) -> DatasetSource:
    """Instantiate the source ``name`` on data root ``root`` with source-specific ``options``.

    Parameters
    ----------
    name:
        Registry name, e.g. ``"imagefolder"`` or ``"synthetic"``.
    root:
        Data root the source reads from (ignored by procedural sources).
    **options:
        Passed to the source's constructor.

    Raises
    ------
    ConfigError
        Unknown dataset name.
    """
    return dataset_class(name)(Path(root), **options)
