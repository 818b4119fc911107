"""CIFAR-10 and CIFAR-100 in torchvision's on-disk format (``"cifar10"``, ``"cifar100"``; Table 2).

::

    <data root>/cifar-10-batches-py/  data_batch_1 ... data_batch_5  test_batch  batches.meta
    <data root>/cifar-100-python/     train  test  meta

The pickled batches are read directly (a safe unpickler; no torchvision
needed): ``data`` is N x 3072 uint8 (R, G, B planes of 32 x 32), labels are
``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100), and class names come
from the meta file in label order. Samples are ``train/00000``... in file
order. The arrays are read on first use and kept in memory (~180 MB).
Both datasets share this file, as in torchvision: they differ only in constants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from pfedmoap_cli.data.resources import Resource
from pfedmoap_cli.data.sources._files import load_pickle, not_found
from pfedmoap_cli.data.sources.base import DatasetSource, Sample
from pfedmoap_cli.data.sources.registry import register_dataset
from pfedmoap_cli.errors import ConfigError, DataError

_TORONTO = "https://www.cs.toronto.edu/~kriz/"


class _CifarSource(DatasetSource):
    folder: ClassVar[str]
    files: ClassVar[dict[str, tuple[str, ...]]]
    meta_file: ClassVar[str]
    names_key: ClassVar[str]
    labels_key: ClassVar[str]
    content_md5: ClassVar[dict[str, str]]  # file -> md5, checked by 'pfedmoap download'
    resources: ClassVar[tuple[Resource, ...]]

    def __init__(self, root: Path, **options: Any) -> None:
        if options:
            raise ConfigError(f"dataset {self.name} takes no options (got {', '.join(sorted(options))}); remove them")
        self.root = Path(root)
        self.base = self.root / self.folder
        self.domains = None
        if not self.base.is_dir():
            raise not_found(self.base, self.name, "dataset folder")
        self._fix = f"delete {self.base} and rerun 'pfedmoap download --dataset {self.name}'"
        meta = load_pickle(self.base / self.meta_file, self._fix, encoding="latin1")
        names = meta.get(self.names_key) if isinstance(meta, dict) else None
        if not isinstance(names, list) or not names:
            raise DataError(f"{self.base / self.meta_file} has no {self.names_key!r}; {self._fix}")
        self.class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in self._arrays:
            images, labels = [], []
            for file in self.files[split]:
                path = self.base / file
                batch = load_pickle(path, self._fix, encoding="latin1")
                try:
                    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                    target = np.asarray(batch[self.labels_key], dtype=np.int64).reshape(-1)
                except (KeyError, TypeError, ValueError) as error:
                    raise DataError(f"{path} is not a CIFAR batch ({error}); {self._fix}") from None
                if len(data) != len(target) or (target.size and not (0 <= target.min() and target.max() < len(self.class_names))):
                    raise DataError(f"{path} has inconsistent images and labels; {self._fix}")
                images.append(data)
                labels.append(target)
            self._arrays[split] = (np.concatenate(images), np.concatenate(labels))
        return self._arrays[split]

    def _list_samples(self, split: str) -> list[Sample]:
        _, labels = self._load(split)
        return [Sample(key=f"{split}/{i:05d}", label=int(y)) for i, y in enumerate(labels)]

    def load_image(self, sample: Sample) -> Image.Image:
        """The 32 x 32 RGB image of ``sample`` (key ``<split>/<index>``)."""
        split, _, index = sample.key.partition("/")
        if split not in self.files or not index.isdigit():
            raise ConfigError(f"{sample.key!r} is not a {self.name} sample key; use samples() of this source")
        images, _ = self._load(split)
        return Image.fromarray(np.ascontiguousarray(images[int(index)].transpose(1, 2, 0)), "RGB")


@register_dataset
class Cifar10Source(_CifarSource):
    """CIFAR-10: 50,000 train / 10,000 test images, 10 classes."""

    name = "cifar10"
    folder = "cifar-10-batches-py"
    files = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
    meta_file = "batches.meta"
    names_key = "label_names"
    labels_key = "labels"
    content_md5 = {  # torchvision's values
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    }
    resources = (
        Resource("cifar-10-python.tar.gz", _TORONTO + "cifar-10-python.tar.gz", "md5:c58f30108f718f92721af3b95e74349a",
                 creates="cifar-10-batches-py", extract_to="."),
    )


@register_dataset
class Cifar100Source(_CifarSource):
    """CIFAR-100: 50,000 train / 10,000 test images, 100 (fine) classes."""

    name = "cifar100"
    folder = "cifar-100-python"
    files = {"train": ("train",), "test": ("test",)}
    meta_file = "meta"
    names_key = "fine_label_names"
    labels_key = "fine_labels"
    content_md5 = {  # torchvision's values
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    }
    resources = (
        Resource("cifar-100-python.tar.gz", _TORONTO + "cifar-100-python.tar.gz", "md5:eb9058c3a382ffc7106e4002c42a8d85",
                 creates="cifar-100-python", extract_to="."),
    )
