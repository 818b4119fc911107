"""Dataset sources, one file each, registered by name.

Importing this package imports every concrete source, which registers it.
"""

from pfedmoap_cli.data.sources.base import DatasetSource, Sample
from pfedmoap_cli.data.sources.registry import (
    dataset_class,
    dataset_names,
    open_dataset,
    register_dataset,
)
from pfedmoap_cli.data.sources import image_folder, synthetic  # noqa: F401  (registration)
from pfedmoap_cli.data.sources import caltech101, cifar, domainnet, domainnet_full, dtd, flowers102, food101, office_caltech10, oxford_pets  # noqa: F401,E501  (registration)

__all__ = [
    "DatasetSource",
    "Sample",
    "dataset_class",
    "dataset_names",
    "open_dataset",
    "register_dataset",
]
