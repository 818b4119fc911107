"""The dataset-source interface: a labelled list of samples per split.

A source knows its class names (in label order), lists its samples in a
deterministic order and loads one image at a time. Partitions index into
``samples(split)``, so that order is part of the contract; ``fingerprint()``
hashes it, so a partition made against a different sample list is refused
instead of silently re-mapped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from PIL import Image

from pfedmoap_cli.artifacts.atomic import sha256_json
from pfedmoap_cli.errors import ConfigError

SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class Sample:
    """One labelled image of a split.

    Attributes
    ----------
    key:
        Stable id within its split (a relative path, or e.g. ``"train/000123"``).
    label:
        Class index into the source's ``class_names``.
    domain:
        Domain name for multi-domain datasets, else ``None``.
    """

    key: str
    label: int
    domain: str | None = None


class DatasetSource(ABC):
    """A dataset as seen by the toolkit: class names, samples per split, images.

    Subclasses set ``name`` (the registry name), ``class_names`` and
    ``domains`` in their constructor, which takes ``(root, **options)``, and
    implement :meth:`_list_samples` and :meth:`load_image`.
    """

    name: ClassVar[str]
    class_names: list[str]
    domains: list[str] | None = None

    # Per-instance caches, created lazily so subclasses need not call super().__init__.
    _sample_cache: dict[str, list[Sample]]
    _fingerprint_cache: str

    @abstractmethod
    def _list_samples(self, split: str) -> list[Sample]:
        """Return the samples of ``split`` (already validated) in a deterministic order."""

    @abstractmethod
    def load_image(self, sample: Sample) -> Image.Image:
        """Return the image of ``sample`` as an RGB PIL image."""

    def samples(self, split: str) -> list[Sample]:
        """Samples of a split, in a deterministic order (cached).

        Parameters
        ----------
        split:
            ``"train"`` or ``"test"``.

        Returns
        -------
        list of Sample
            A fresh list each call (the cache itself is never handed out).
        """
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        cache = self.__dict__.setdefault("_sample_cache", {})
        if split not in cache:
            cache[split] = list(self._list_samples(split))
        return list(cache[split])

    def fingerprint(self) -> str:
        """Hex sha256 of the name, class names and both sample lists (cached).

        Any change in sample order, keys, labels or domains changes it, which
        is what lets a partition refuse a dataset that is not the one it indexes.
        Sources whose pixels depend on more than the sample list add that via
        :meth:`_fingerprint_extras` (stored under ``"extras"`` only when non-empty).
        """
        cached = self.__dict__.get("_fingerprint_cache")
        if cached is None:
            payload = {
                "name": self.name,
                "class_names": list(self.class_names),
                **{
                    split: [[s.key, s.label, s.domain] for s in self.samples(split)]
                    for split in SPLITS
                },
            }
            extras = self._fingerprint_extras()
            if extras:
                payload["extras"] = extras
            cached = sha256_json(payload)
            self._fingerprint_cache = cached
        return cached

    def _fingerprint_extras(self) -> dict[str, object]:
        """JSON-able settings that change the images without changing the sample list."""
        return {}

    def labels(self, split: str) -> list[int]:
        """Labels of ``samples(split)``, in the same order (a convenience for partitioners)."""
        return [s.label for s in self.samples(split)]
