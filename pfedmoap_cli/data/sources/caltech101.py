"""Caltech101 in CoOp's layout (``"caltech101"``; Table 1).

::

    <data root>/caltech-101/
        101_ObjectCategories/<class>/image_0001.jpg (101_ObjectCategories.tar.gz,
                                                     inside caltech-101.zip)
        split_zhou_Caltech101.json                  (CoOp's split, from Google Drive)

CoOp split: 4,128 train / 2,465 test images, 100 classes: the folders minus
``BACKGROUND_Google`` and ``Faces_easy``, with four renamed (``airplanes`` ->
``airplane``, ``Faces`` -> ``face``, ``Leopards`` -> ``leopard``,
``Motorbikes`` -> ``motorbike``). The generated split does the same, labels
following the case-sensitive sorted folder order as in CoOp.
"""

from __future__ import annotations

from pfedmoap_cli.data.resources import Resource
from pfedmoap_cli.data.sources.coop import CoopSplitSource, class_folders, image_files
from pfedmoap_cli.data.sources.registry import register_dataset

IGNORED = ("BACKGROUND_Google", "Faces_easy")
RENAMED = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}


@register_dataset
class Caltech101Source(CoopSplitSource):
    """Caltech101 (100 object classes, background excluded) with CoOp's split."""

    name = "caltech101"
    folder = "caltech-101"
    image_dir = "101_ObjectCategories"
    split_file = "split_zhou_Caltech101.json"
    split_url = "https://drive.google.com/file/d/1hyarUivQE36mY6jSomru6Fjd-JzwcCzN/view?usp=sharing"
    num_classes = 100
    resources = (
        # torchvision's source; the zip wraps 101_ObjectCategories.tar.gz, which is what we unpack.
        Resource("caltech-101/caltech-101.zip", "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
                 "md5:3138e1922a9193bfa496528edbbc45d0", creates="caltech-101/101_ObjectCategories",
                 extract_to="caltech-101", inner="caltech-101/101_ObjectCategories.tar.gz"),
        Resource("caltech-101/split_zhou_Caltech101.json", split_url, None,
                 creates="caltech-101/split_zhou_Caltech101.json", manual=True),
    )

    def generated_classes(self) -> list[tuple[str, list[str]]]:
        return [
            (RENAMED.get(folder, folder), [f"{folder}/{f}" for f in image_files(self.images / folder)])
            for folder in class_folders(self.images, ignore=IGNORED)
        ]
