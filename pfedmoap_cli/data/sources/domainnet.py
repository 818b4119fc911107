"""DomainNet, FedBN's 10-class subset (``"domainnet"``; Table 3).

::

    <data root>/DomainNet/
        clipart_train.pkl  clipart_test.pkl  ...  sketch_test.pkl   (FedBN's domainnet_dataset.zip)
        clipart/<class>/<image>.jpg  ...  sketch/...                (the six official domain zips)

Six domains (clipart, infograph, painting, quickdraw, real, sketch; client
order is domain-major in this order), 10 classes in FedBN's label order:
bird, feather, headphones, ice_cream, teapot, tiger, whale, windmill,
wine_glass, zebra. 18,278 train / 4,573 test images. Labels come from each
image's own text label (see :mod:`pfedmoap_cli.data.sources.fedbn`).
"""

from __future__ import annotations

from pfedmoap_cli.data.resources import Resource
from pfedmoap_cli.data.sources.fedbn import FedBNPickleSource
from pfedmoap_cli.data.sources.registry import register_dataset

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
CLASSES = ("bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale", "windmill", "wine_glass", "zebra")
FEDBN_SPLIT_URL = "https://drive.google.com/file/d/1_dx2-YDdvnNlQ13DTgDnLoGvMZvMyccR/view?usp=sharing"

_BU = "http://csr.bu.edu/ftp/visda/2019/multi-source/"
# Official DomainNet archives (cleaned clipart and painting under groundtruth/).
# md5 values as published in other open-source loaders; "real" confirmed by two independent ones.
DOMAIN_ARCHIVES = {
    "clipart": (_BU + "groundtruth/clipart.zip", "md5:cd0d8f2d77a4e181449b78ed62bccf1e"),
    "infograph": (_BU + "infograph.zip", "md5:720380b86f9e6ab4805bb38b6bd135f8"),
    "painting": (_BU + "groundtruth/painting.zip", "md5:1ae32cdb4f98fe7ab5eb0a351768abfd"),
    "quickdraw": (_BU + "quickdraw.zip", "md5:bdc1b6f09f277da1a263389efe0c7a66"),
    "real": (_BU + "real.zip", "md5:dcc47055e8935767784b7162e7c7cca6"),
    "sketch": (_BU + "sketch.zip", "md5:658d8009644040ff7ce30bb2e820850f"),
}
IMAGE_RESOURCES = tuple(
    Resource(f"DomainNet/{d}.zip", url, md5, creates=f"DomainNet/{d}", extract_to="DomainNet")
    for d, (url, md5) in DOMAIN_ARCHIVES.items()
)


@register_dataset
class DomainNetSource(FedBNPickleSource):
    """FedBN's DomainNet subset: 6 domains x 10 classes."""

    name = "domainnet"
    folder = "DomainNet"
    all_domains = DOMAINS
    classes = CLASSES
    archive_hint = f"unzip FedBN's domainnet_dataset.zip ({FEDBN_SPLIT_URL}) in the data root"
    resources = (
        Resource("domainnet_dataset.zip", FEDBN_SPLIT_URL, None, creates="DomainNet/clipart_train.pkl", extract_to=".", manual=True),
        *IMAGE_RESOURCES,
    )
