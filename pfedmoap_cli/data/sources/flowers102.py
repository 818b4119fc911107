"""Oxford Flowers102 in CoOp's layout (``"flowers102"``; Table 1).

::

    <data root>/oxford_flowers/
        jpg/image_00001.jpg ... image_08189.jpg     (102flowers.tgz)
        imagelabels.mat                             (labels 1..102 per image)
        split_zhou_OxfordFlowers.json               (CoOp's split, from Google Drive)
        cat_to_name.json                            (optional: CoOp's class names)

CoOp split: 4,093 train / 2,463 test images, 102 classes. The generated split
(``--option split=generated``) reads labels from ``imagelabels.mat`` (needs
scipy) and names from ``cat_to_name.json``, else torchvision's Flowers102 list.
"""

from __future__ import annotations

import json

from pfedmoap_cli.compat import import_torchvision
from pfedmoap_cli.data.resources import Resource
from pfedmoap_cli.data.sources.coop import CoopSplitSource, image_files
from pfedmoap_cli.data.sources.registry import register_dataset
from pfedmoap_cli.errors import DataError

_VGG = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"


@register_dataset
class Flowers102Source(CoopSplitSource):
    """Oxford Flowers102 (102 classes) with CoOp's split."""

    name = "flowers102"
    folder = "oxford_flowers"
    image_dir = "jpg"
    split_file = "split_zhou_OxfordFlowers.json"
    split_url = "https://drive.google.com/file/d/1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT/view?usp=sharing"
    num_classes = 102
    resources = (
        Resource("oxford_flowers/102flowers.tgz", _VGG + "102flowers.tgz", "md5:52808999861908f626f3c1f4e79d11fa",
                 creates="oxford_flowers/jpg", extract_to="oxford_flowers"),
        Resource("oxford_flowers/imagelabels.mat", _VGG + "imagelabels.mat", "md5:e0620be6f572b9609742df49c70aed4d",
                 creates="oxford_flowers/imagelabels.mat"),
        Resource("oxford_flowers/split_zhou_OxfordFlowers.json", split_url, None,
                 creates="oxford_flowers/split_zhou_OxfordFlowers.json", manual=True),
    )

    def generated_classes(self) -> list[tuple[str, list[str]]]:
        labels_path = self.base / "imagelabels.mat"
        try:
            from scipy.io import loadmat
        except ImportError:
            raise DataError("a generated flowers102 split reads imagelabels.mat, which needs scipy; pip install scipy, or get CoOp's split file") from None
        if not labels_path.is_file():
            raise DataError(f"{labels_path} is missing; rerun 'pfedmoap download --dataset flowers102'")
        labels = [int(v) - 1 for v in loadmat(str(labels_path))["labels"].reshape(-1)]
        files = image_files(self.images)
        if len(files) != len(labels):
            raise DataError(f"{self.images} has {len(files)} images but imagelabels.mat labels {len(labels)}; re-extract 102flowers.tgz")
        names_path = self.base / "cat_to_name.json"
        if names_path.is_file():
            mapping = json.loads(names_path.read_text(encoding="utf-8"))
            names = [mapping[str(k + 1)] for k in range(self.num_classes)]
        else:
            names = list(import_torchvision().datasets.Flowers102.classes)
        members: list[list[str]] = [[] for _ in names]
        for file, label in zip(files, labels):
            members[label].append(file)
        return list(zip(names, members))
