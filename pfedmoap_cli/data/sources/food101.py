"""Food-101 in CoOp's layout (``"food101"``; Table 1).

::

    <data root>/food-101/
        images/<class>/<id>.jpg                     (food-101.tar.gz)
        meta/
        split_zhou_Food101.json                     (CoOp's split, from Google Drive)

CoOp split: 50,500 train / 30,300 test images, 101 classes (folder names such
as ``"apple_pie"``). The generated split uses the sorted class folders.
"""

from __future__ import annotations

from pfedmoap_cli.data.resources import Resource
from pfedmoap_cli.data.sources.coop import CoopSplitSource
from pfedmoap_cli.data.sources.registry import register_dataset


@register_dataset
class Food101Source(CoopSplitSource):
    """Food-101 (101 dishes) with CoOp's split."""

    name = "food101"
    folder = "food-101"
    image_dir = "images"
    split_file = "split_zhou_Food101.json"
    split_url = "https://drive.google.com/file/d/1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl/view?usp=sharing"
    num_classes = 101
    resources = (
        Resource("food-101.tar.gz", "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", "md5:85eeb15f3717b99a5da872d97d918f87",
                 creates="food-101/images", extract_to="."),
        Resource("food-101/split_zhou_Food101.json", split_url, None, creates="food-101/split_zhou_Food101.json", manual=True),
    )
