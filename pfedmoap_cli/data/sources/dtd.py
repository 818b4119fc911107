"""Describable Textures (DTD) in CoOp's layout (``"dtd"``; Table 1).

::

    <data root>/dtd/
        images/<class>/<class>_0001.jpg             (dtd-r1.0.1.tar.gz)
        imdb/  labels/
        split_zhou_DescribableTextures.json         (CoOp's split, from Google Drive)

CoOp split: 2,820 train / 1,692 test images, 47 classes (folder names such as
``"banded"``). The generated split uses the sorted class folders.
"""

from __future__ import annotations

from pfedmoap_cli.data.resources import Resource
from pfedmoap_cli.data.sources.coop import CoopSplitSource
from pfedmoap_cli.data.sources.registry import register_dataset


@register_dataset
class DTDSource(CoopSplitSource):
    """DTD (47 textures) with CoOp's split."""

    name = "dtd"
    folder = "dtd"
    image_dir = "images"
    split_file = "split_zhou_DescribableTextures.json"
    split_url = "https://drive.google.com/file/d/1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x/view?usp=sharing"
    num_classes = 47
    resources = (
        Resource("dtd-r1.0.1.tar.gz", "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
                 "md5:fff73e5086ae6bdbea199a49dfb8a4c1", creates="dtd/images", extract_to="."),
        Resource("dtd/split_zhou_DescribableTextures.json", split_url, None,
                 creates="dtd/split_zhou_DescribableTextures.json", manual=True),
    )
