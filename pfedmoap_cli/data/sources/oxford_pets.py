"""Oxford-IIIT Pets in CoOp's layout (``"oxford_pets"``; Table 1).

::

    <data root>/oxford_pets/
        images/Abyssinian_1.jpg ...                 (images.tar.gz)
        annotations/                                (annotations.tar.gz)
        split_zhou_OxfordPets.json                  (CoOp's split, from Google Drive)

CoOp split: 2,944 train / 3,669 test images, 37 classes named by the
lower-cased breed (``"american_bulldog"``). The generated split takes the breed
from each file name (``<Breed_Name>_<n>.jpg``); sorted lower-cased breeds give
the same label order as the official class ids.
"""

from __future__ import annotations

from pfedmoap_cli.data.resources import Resource
from pfedmoap_cli.data.sources.coop import CoopSplitSource, image_files
from pfedmoap_cli.data.sources.registry import register_dataset

_VGG = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/"


@register_dataset
class OxfordPetsSource(CoopSplitSource):
    """Oxford-IIIT Pets (37 breeds) with CoOp's split."""

    name = "oxford_pets"
    folder = "oxford_pets"
    image_dir = "images"
    split_file = "split_zhou_OxfordPets.json"
    split_url = "https://drive.google.com/file/d/1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs/view?usp=sharing"
    num_classes = 37
    resources = (
        Resource("oxford_pets/images.tar.gz", _VGG + "images.tar.gz", "md5:5c4f3ee8e5d25df40f4fd59a7f44e54c",
                 creates="oxford_pets/images", extract_to="oxford_pets"),
        Resource("oxford_pets/annotations.tar.gz", _VGG + "annotations.tar.gz", "md5:95a8c909bbe2e81eed6a22bccdf3f68f",
                 creates="oxford_pets/annotations", extract_to="oxford_pets"),
        Resource("oxford_pets/split_zhou_OxfordPets.json", split_url, None,
                 creates="oxford_pets/split_zhou_OxfordPets.json", manual=True),
    )

    def generated_classes(self) -> list[tuple[str, list[str]]]:
        by_breed: dict[str, list[str]] = {}
        for file in image_files(self.images):
            breed = file.rsplit(".", 1)[0].rsplit("_", 1)[0].lower()
            by_breed.setdefault(breed, []).append(file)
        return sorted(by_breed.items())
