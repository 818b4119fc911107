"""Shared loader of FedBN's preprocessed multi-domain lists (DomainNet subset, Office-Caltech10).

FedBN (Li et al., ICLR 2021) ships, per domain and split, a pickle
``<folder>/<domain>_<train|test>.pkl`` holding a pair ``(image paths, text
labels)``; the paths are relative to the data root (FedBN's ``data/``), e.g.
``DomainNet/clipart/bird/clipart_015_000001.jpg``. Labels are the TEXT labels
mapped through the dataset's fixed class order, image by image, so image i
always carries its own label and class k is ``class_names[k]`` -- the fix of
the reference code's defect 1 (PROTOCOL.md section 7), which read images from
the full list but labels from a subset, and kept class names in a set.

Samples are listed domain-major (the dataset's domain order), each domain in
its pickle's order; keys are the image paths, which include the domain folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from pfedmoap_cli.data.resources import Resource
from pfedmoap_cli.data.sources._files import load_pickle, not_found, open_rgb, require_files
from pfedmoap_cli.data.sources.base import DatasetSource, Sample
from pfedmoap_cli.errors import ConfigError, DataError

_PREFIXES = ("./", "../data/", "data/")  # tolerated leading parts of a stored path


def _normalise(path: str) -> str:
    path = path.replace("\\", "/")
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if path.startswith(prefix):
                path, changed = path[len(prefix) :], True
    return path


class FedBNPickleSource(DatasetSource):
    """A multi-domain dataset read from FedBN's ``<domain>_<split>.pkl`` lists.

    Parameters
    ----------
    root:
        The data root (FedBN's ``data/``: it holds ``<folder>/`` with the pickles and images).
    **options:
        None.
    """

    folder: ClassVar[str]
    all_domains: ClassVar[tuple[str, ...]]
    classes: ClassVar[tuple[str, ...]]
    archive_hint: ClassVar[str]  # how to get the pickles, for error messages
    resources: ClassVar[tuple[Resource, ...]]

    def __init__(self, root: Path, **options: Any) -> None:
        if options:
            raise ConfigError(f"dataset {self.name} takes no options (got {', '.join(sorted(options))}); remove them")
        self.root = Path(root)
        self.base = self.root / self.folder
        self.class_names = list(self.classes)
        self.domains = list(self.all_domains)
        if not self.base.is_dir():
            raise not_found(self.base, self.name, "dataset folder")
        label_of = {name: k for k, name in enumerate(self.class_names)}
        self._splits = {split: self._read_split(split, label_of) for split in ("train", "test")}

    def _read_split(self, split: str, label_of: dict[str, int]) -> list[Sample]:
        samples: list[Sample] = []
        for domain in self.domains:
            path = self.base / f"{domain}_{split}.pkl"
            fix = f"get it again: {self.archive_hint}"
            data = load_pickle(path, fix)
            if not (isinstance(data, (tuple, list)) and len(data) == 2):
                raise DataError(f"{path} is not a pickled (paths, labels) pair; {fix}")
            paths, texts = (list(part) for part in data)
            if len(paths) != len(texts):
                raise DataError(f"{path} has {len(paths)} paths but {len(texts)} labels; {fix}")
            keys = [_normalise(str(p)) for p in paths]
            for text in texts:
                if str(text) not in label_of:
                    raise DataError(
                        f"{path} has label {str(text)!r}, not one of the {len(label_of)} {self.name} classes; {fix}"
                    )
            if len(set(keys)) != len(keys):
                raise DataError(f"{path} lists an image twice; {fix}")
            samples.extend(Sample(key=k, label=label_of[str(t)], domain=domain) for k, t in zip(keys, texts))
        require_files(
            self.root, (s.key for s in samples),
            f"unpack the {self.name} images under {self.root} (see 'pfedmoap download --dataset {self.name}')",
        )
        return samples

    def _list_samples(self, split: str) -> list[Sample]:
        return self._splits[split]

    def load_image(self, sample: Sample) -> Image.Image:
        """Open ``<data root>/<sample.key>`` as RGB (grey images become 3-channel, as in FedBN)."""
        return open_rgb(self.root / sample.key)
