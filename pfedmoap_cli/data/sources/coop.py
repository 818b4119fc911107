"""Shared loader of the five Table 1 datasets in CoOp's on-disk layout.

Each dataset lives in its own folder under the data root with its images and
CoOp's fixed split file ``split_zhou_<Name>.json``: a JSON object with
``train``, ``val`` and ``test`` lists of ``[image path relative to the image
folder, label, class name]``. We use CoOp's ``train`` list as the train split
and its ``test`` list as the test split; ``val`` is not used (the paper
selects nothing on it). Labels and class order are exactly those of the split
file: class ``k`` is the name its entries with label ``k`` carry.

Without the split file (option ``split="generated"``) a deterministic split
of our own is derived from the images: per class, the files sorted by name are
permuted by ``numpy.random.default_rng([20250101, label])`` and cut like
CoOp's own generator, 50% train / 20% val (unused) / 30% test. The option is
stored in every partition made from it and changes the dataset fingerprint, so
a generated split is never mistaken for CoOp's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from pfedmoap_cli.data.resources import Resource
from pfedmoap_cli.data.sources._files import not_found, open_rgb, require_files
from pfedmoap_cli.data.sources.base import DatasetSource, Sample
from pfedmoap_cli.errors import ConfigError, DataError

SPLIT_CHOICES = ("coop", "generated")
GENERATED_SPLIT_SEED = 20250101
GENERATED_FRACTIONS = (0.5, 0.2)  # train, val (dropped); the rest is test -- CoOp's p_trn / p_val
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_files(folder: Path) -> list[str]:
    """Names of the image files directly in ``folder``, sorted."""
    return sorted(
        p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def class_folders(folder: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """Visible sub-folder names of ``folder`` in Python's (case-sensitive) sorted order, as CoOp lists them."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in ignore)


class CoopSplitSource(DatasetSource):
    """A CoOp-layout dataset: ``<folder>/<image_dir>/...`` plus ``<folder>/<split_file>``.

    Subclasses set the class constants below and, for the generated split,
    :meth:`generated_classes`.

    Parameters
    ----------
    root:
        The data root (the folder that holds ``<folder>/``).
    split:
        ``"coop"`` (default): read CoOp's split file, which must exist.
        ``"generated"``: derive a deterministic split from the images.
    """

    folder: ClassVar[str]
    image_dir: ClassVar[str]
    split_file: ClassVar[str]
    split_url: ClassVar[str]
    num_classes: ClassVar[int]
    resources: ClassVar[tuple[Resource, ...]]

    def __init__(self, root: Path, **options: Any) -> None:
        unknown = sorted(set(options) - {"split"})
        if unknown:
            raise ConfigError(f"dataset {self.name} has no option(s) {', '.join(unknown)}; its only option is split (coop or generated)")
        self.split = str(options.get("split", "coop"))
        if self.split not in SPLIT_CHOICES:
            raise ConfigError(f"dataset {self.name}: split must be one of {', '.join(SPLIT_CHOICES)}, got {self.split!r}")
        self.root = Path(root)
        self.base = self.root / self.folder
        self.images = self.base / self.image_dir
        self.domains = None
        if not self.base.is_dir():
            raise not_found(self.base, self.name, "dataset folder")
        if not self.images.is_dir():
            raise not_found(self.images, self.name, "image folder")
        if self.split == "coop":
            self.class_names, self._splits = self._read_split_file()
        else:
            self.class_names, self._splits = self._generate_split()
        if len(self.class_names) != self.num_classes:
            raise DataError(
                f"{self.name} should have {self.num_classes} classes but {self._origin()} gives {len(self.class_names)}; "
                f"check that {self.base} holds the right dataset"
            )
        require_files(
            self.images,
            (s.key for split in self._splits.values() for s in split),
            f"re-extract the {self.name} images (rerun 'pfedmoap download --dataset {self.name}')",
        )

    # ------------------------------------------------------------------ CoOp split file

    def _origin(self) -> str:
        return str(self.base / self.split_file) if self.split == "coop" else f"the images under {self.images}"

    def _read_split_file(self) -> tuple[list[str], dict[str, list[Sample]]]:
        path = self.base / self.split_file
        fix = f"download it from {self.split_url} into {self.base}"
        if not path.is_file():
            raise DataError(
                f"CoOp split file {path} is missing; {fix}, or pass --option split=generated to derive a split of our own"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{path} is not valid JSON ({error}); {fix} again") from None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("train", "test")):
            raise DataError(f"{path} lacks 'train' and 'test' lists; {fix} again")
        names: dict[int, str] = {}
        splits: dict[str, list[Sample]] = {}
        for split in ("train", "val", "test"):
            samples = []
            for position, item in enumerate(data.get(split) or []):
                if not (
                    isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                    and isinstance(item[1], int) and not isinstance(item[1], bool) and isinstance(item[2], str)
                    and item[1] >= 0
                ):
                    raise DataError(f"{path}: {split}[{position}] is not [image path, label, class name]; {fix} again")
                impath, label, cname = item
                if names.setdefault(label, cname) != cname:
                    raise DataError(f"{path}: label {label} is called both {names[label]!r} and {cname!r}; {fix} again")
                samples.append(Sample(key=impath.replace("\\", "/"), label=label))
            if split != "val":  # CoOp's val list only contributes class names
                splits[split] = samples
        if sorted(names) != list(range(len(names))):
            raise DataError(f"{path}: labels are not 0..{len(names) - 1} without gaps; {fix} again")
        return [names[k] for k in range(len(names))], splits

    # ------------------------------------------------------------------ generated split

    def generated_classes(self) -> list[tuple[str, list[str]]]:
        """``(class name, image paths relative to the image folder)`` in label order.

        Default: one sub-folder per class, sorted (Food101, DTD).
        """
        return [(name, [f"{name}/{f}" for f in image_files(self.images / name)]) for name in class_folders(self.images)]

    def _generate_split(self) -> tuple[list[str], dict[str, list[Sample]]]:
        classes = self.generated_classes()
        train: list[Sample] = []
        test: list[Sample] = []
        for label, (name, paths) in enumerate(classes):
            if len(paths) < 2:
                raise DataError(f"class {name!r} under {self.images} has {len(paths)} image(s); a generated split needs at least 2 per class")
            order = np.random.default_rng([GENERATED_SPLIT_SEED, label]).permutation(len(paths))
            n_train = max(1, round(len(paths) * GENERATED_FRACTIONS[0]))
            n_val = round(len(paths) * GENERATED_FRACTIONS[1])
            n_test = max(1, len(paths) - n_train - n_val)
            n_train = min(n_train, len(paths) - n_test)
            shuffled = [paths[i] for i in order]
            train.extend(Sample(key=p, label=label) for p in sorted(shuffled[:n_train]))
            test.extend(Sample(key=p, label=label) for p in sorted(shuffled[len(paths) - n_test :]))
        return [name for name, _ in classes], {"train": train, "test": test}

    def _fingerprint_extras(self) -> dict[str, object]:
        if self.split == "generated":
            return {"split": "generated", "seed": GENERATED_SPLIT_SEED, "fractions": list(GENERATED_FRACTIONS)}
        return {}

    # ------------------------------------------------------------------ DatasetSource

    def _list_samples(self, split: str) -> list[Sample]:
        return self._splits[split]

    def load_image(self, sample: Sample) -> Image.Image:
        """Open ``<image folder>/<sample.key>`` as RGB."""
        return open_rgb(self.images / sample.key)
