"""Full DomainNet, 345 classes, with the official lists (``"domainnet_full"``).

::

    <data root>/DomainNet/
        clipart_train.txt  clipart_test.txt  ...  sketch_test.txt   (official split lists)
        clipart/<class>/<image>.jpg  ...                            (the six domain zips)

Each list line is ``<domain>/<class>/<file> <label>`` relative to
``DomainNet/``. Class ``k`` is named by the folder of its images (the same in
every domain and split, else an error); labels must be 0..C-1 without gaps
over all lists together (painting's lists lack a class each, which is fine).
The images are the same files the FedBN subset (``"domainnet"``) uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from pfedmoap_cli.data.resources import Resource
from pfedmoap_cli.data.sources._files import not_found, open_rgb, require_files
from pfedmoap_cli.data.sources.base import DatasetSource, Sample
from pfedmoap_cli.data.sources.domainnet import DOMAINS, IMAGE_RESOURCES
from pfedmoap_cli.data.sources.registry import register_dataset
from pfedmoap_cli.errors import ConfigError, DataError

_TXT = "http://csr.bu.edu/ftp/visda/2019/multi-source/domainnet/txt/"
# md5 values as published in other open-source loaders (real_* confirmed by two independent ones).
LIST_MD5 = {
    ("clipart", "train"): "b4349693a7f9c05c53955725c47ed6cb", ("clipart", "test"): "f5ddbcfd657a3acf9d0f7da10db22565",
    ("infograph", "train"): "379b50054f4ac2018dca4f89421b92d9", ("infograph", "test"): "779626b50869edffe8ea6941c3755c71",
    ("painting", "train"): "7db0e7ca73ad9982f6e1f7f3ef372c0a", ("painting", "test"): "232b35dc53f26d414686ae579e38d9b5",
    ("quickdraw", "train"): "b732ced3939ac8efdd8c0a889dca56cc", ("quickdraw", "test"): "c1a828fdfe216fb109f1c0083a252c6f",
    ("real", "train"): "8ebf02c2075fadd564705f0dc7cd6291", ("real", "test"): "6098816791c3ebed543c71ffa11b9054",
    ("sketch", "train"): "1233bd18aa9a8a200bf4cecf1c34ef3e", ("sketch", "test"): "d8a222e4672cfd585298aa14d02ea441",
}


@register_dataset
class DomainNetFullSource(DatasetSource):
    """All of DomainNet: 6 domains x 345 classes, official train/test lists.

    Parameters
    ----------
    root:
        The data root (it holds ``DomainNet/``).
    **options:
        None.
    """

    name = "domainnet_full"
    folder = "DomainNet"
    resources = (
        *IMAGE_RESOURCES,
        *(
            Resource(f"DomainNet/{d}_{s}.txt", f"{_TXT}{d}_{s}.txt", f"md5:{LIST_MD5[d, s]}", creates=f"DomainNet/{d}_{s}.txt")
            for d in DOMAINS
            for s in ("train", "test")
        ),
    )

    def __init__(self, root: Path, **options: Any) -> None:
        if options:
            raise ConfigError(f"dataset {self.name} takes no options (got {', '.join(sorted(options))}); remove them")
        self.root = Path(root)
        self.base = self.root / self.folder
        self.domains = list(DOMAINS)
        if not self.base.is_dir():
            raise not_found(self.base, self.name, "dataset folder")
        names: dict[int, str] = {}
        self._splits = {split: self._read_lists(split, names) for split in ("train", "test")}
        if sorted(names) != list(range(len(names))):
            raise DataError(f"the DomainNet lists in {self.base} do not use labels 0..{len(names) - 1} without gaps; download them again")
        self.class_names = [names[k] for k in range(len(names))]

    def _read_lists(self, split: str, names: dict[int, str]) -> list[Sample]:
        samples: list[Sample] = []
        for domain in self.domains:
            path = self.base / f"{domain}_{split}.txt"
            fix = f"rerun 'pfedmoap download --dataset {self.name}'"
            if not path.is_file():
                raise DataError(f"DomainNet list {path} is missing; {fix}")
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.split()
                rel = parts[0] if len(parts) == 2 else ""
                folders = rel.split("/")
                if len(folders) != 3 or folders[0] != domain or not parts[1].isdigit():
                    raise DataError(f"{path}:{number} is not '{domain}/<class>/<file> <label>'; {fix}")
                label = int(parts[1])
                if names.setdefault(label, folders[1]) != folders[1]:
                    raise DataError(f"{path}:{number}: label {label} is both {names[label]!r} and {folders[1]!r}; {fix}")
                samples.append(Sample(key=rel, label=label, domain=domain))
        require_files(self.base, (s.key for s in samples), f"unpack the six DomainNet zips in {self.base} ({fix})")
        return samples

    def _list_samples(self, split: str) -> list[Sample]:
        return self._splits[split]

    def load_image(self, sample: Sample) -> Image.Image:
        """Open ``DomainNet/<sample.key>`` as RGB."""
        return open_rgb(self.base / sample.key)
