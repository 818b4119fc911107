"""Office-Caltech10, FedBN's preprocessed version (``"office_caltech10"``; Table 4).

::

    <data root>/office_caltech_10/
        amazon_train.pkl  amazon_test.pkl  ...  webcam_test.pkl
        amazon/<class>/<image>.jpg  caltech/...  dslr/...  webcam/...

All of it comes in FedBN's office_caltech_10_dataset.zip (Google Drive), unzipped
in the data root. Four domains (amazon, caltech, dslr, webcam; client order
domain-major), 10 classes in FedBN's label order: back_pack, bike, calculator,
headphones, keyboard, laptop_computer, monitor, mouse, mug, projector.
2,025 train / 508 test images.
"""

from __future__ import annotations

from pfedmoap_cli.data.resources import Resource
from pfedmoap_cli.data.sources.fedbn import FedBNPickleSource
from pfedmoap_cli.data.sources.registry import register_dataset

DOMAINS = ("amazon", "caltech", "dslr", "webcam")
CLASSES = (
    "back_pack", "bike", "calculator", "headphones", "keyboard",
    "laptop_computer", "monitor", "mouse", "mug", "projector",
)
FEDBN_URL = "https://drive.google.com/file/d/1gxhV5xRXQgC9AL4XexduH7hdxDng7bJ3/view?usp=sharing"


@register_dataset
class OfficeCaltech10Source(FedBNPickleSource):
    """FedBN's Office-Caltech10: 4 domains x 10 classes."""

    name = "office_caltech10"
    folder = "office_caltech_10"
    all_domains = DOMAINS
    classes = CLASSES
    archive_hint = f"unzip FedBN's office_caltech_10_dataset.zip ({FEDBN_URL}) in the data root"
    resources = (
        Resource("office_caltech_10_dataset.zip", FEDBN_URL, None, creates="office_caltech_10/amazon_train.pkl",
                 extract_to=".", manual=True),
    )
