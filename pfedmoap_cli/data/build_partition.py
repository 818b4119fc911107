"""Turn a dataset source and a scheme into a :class:`Partition` artifact."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from pfedmoap_cli.artifacts.partition import Partition, PartitionClient, check_no_empty_clients
from pfedmoap_cli.data import partitioners
from pfedmoap_cli.data.sources.base import DatasetSource
from pfedmoap_cli.errors import ConfigError

SCHEMES = ("iid", "dirichlet", "pathological")


@dataclass(frozen=True)
class PartitionSettings:
    """How to split a dataset over clients."""

    scheme: str
    num_clients: int
    seed: int = 1
    alpha: float | None = None
    shots: int | None = None
    min_size: int = 2
    clients_per_domain: int | None = None
    #: Base-to-novel generalisation (PROTOCOL-MORE.md section 6): the clients
    #: get samples of the first ceil(C/2) classes only (the base classes); the
    #: others (the novel classes) are kept for evaluation.
    base_to_novel: bool = False

    def params(self) -> dict[str, Any]:
        """The parameters recorded in the partition file (``base_to_novel`` only when set, so older files keep their bytes)."""
        params: dict[str, Any] = {"num_clients": self.num_clients, "seed": self.seed}
        if self.scheme == "dirichlet":
            params.update(alpha=self.alpha, min_size=self.min_size)
        if self.scheme == "pathological":
            params.update(shots=self.shots)
        if self.clients_per_domain is not None:
            params.update(clients_per_domain=self.clients_per_domain)
        if self.base_to_novel:
            params.update(base_to_novel=True)
        return params


def base_class_count(num_classes: int) -> int:
    """m = ceil(C / 2): the base classes of a base-to-novel split are labels 0..m-1, the novel ones m..C-1."""
    return math.ceil(num_classes / 2)


def _split(settings: PartitionSettings, train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int, num_clients: int, seed: int):
    if settings.scheme == "iid":
        return partitioners.partition_iid(train_labels, test_labels, num_clients=num_clients, seed=seed)
    if settings.scheme == "dirichlet":
        return partitioners.partition_dirichlet(
            train_labels,
            test_labels,
            num_classes=num_classes,
            num_clients=num_clients,
            alpha=settings.alpha,
            seed=seed,
            min_size=settings.min_size,
        )
    if settings.scheme == "pathological":
        return partitioners.partition_pathological(
            train_labels, test_labels, num_classes=num_classes, num_clients=num_clients, shots=settings.shots, seed=seed
        )
    raise ConfigError(f"unknown partition scheme '{settings.scheme}'; choose one of: {', '.join(SCHEMES)}")


def empty_client_fix(settings: PartitionSettings) -> str:
    """What to change when ``settings`` leave a client with no train or test samples.

    Parameters
    ----------
    settings:
        The settings that produced the partition.

    Returns
    -------
    str
        The fix in terms of the ``pfedmoap partition`` flags of this scheme.
    """
    fewer = "fewer --clients-per-domain" if settings.clients_per_domain is not None else "fewer --clients"
    if settings.scheme == "dirichlet":
        return f"raise --min-size, use a larger --dirichlet alpha or {fewer}"
    return f"use {fewer}"


def build_partition(source: DatasetSource, settings: PartitionSettings, dataset_options: dict[str, Any]) -> Partition:
    """Split ``source`` over clients as ``settings`` say and describe the result.

    Parameters
    ----------
    source:
        The dataset to split.
    settings:
        Scheme, client count, seed and scheme parameters.
    dataset_options:
        The options ``source`` was opened with, recorded in the partition.

    Returns
    -------
    Partition
        Every client has at least one train and one test sample.

    Raises
    ------
    ConfigError
        Bad settings (unknown scheme, domains asked of a dataset without them, ...).
    DataError
        The data cannot be split as asked, including a split that would leave
        some client with no train or no test samples.
    """
    if settings.num_clients < 1:
        raise ConfigError("--clients must be at least 1")
    train, test = source.samples("train"), source.samples("test")
    train_labels = np.array([s.label for s in train], dtype=np.int64)
    test_labels = np.array([s.label for s in test], dtype=np.int64)
    num_classes = len(source.class_names)
    # Positions of the samples the schemes split (all of them, or the base
    # classes' only); the schemes return positions in these subsets, mapped
    # back to the dataset's own sample indices below.
    train_keep = np.arange(len(train), dtype=np.int64)
    test_keep = np.arange(len(test), dtype=np.int64)
    class_names = tuple(source.class_names)
    novel_names: tuple[str, ...] = ()
    if settings.base_to_novel:
        if num_classes < 2:
            raise ConfigError(f"dataset {source.name} has {num_classes} class; base-to-novel needs at least 2 classes, drop --base-to-novel")
        num_classes = base_class_count(num_classes)
        class_names, novel_names = class_names[:num_classes], class_names[num_classes:]
        train_keep, test_keep = np.flatnonzero(train_labels < num_classes), np.flatnonzero(test_labels < num_classes)
        train_labels, test_labels = train_labels[train_keep], test_labels[test_keep]
    if settings.clients_per_domain is not None:
        if not source.domains:
            raise ConfigError(f"dataset {source.name} has no domains; drop --clients-per-domain")
        train_domains = [train[i].domain for i in train_keep]
        test_domains = [test[i].domain for i in test_keep]

        def split_fn(train_idx, test_idx, count, domain_index):
            return _split(
                settings, train_labels[train_idx], test_labels[test_idx], num_classes, count, partitioners.domain_seed(settings.seed, domain_index)
            )

        splits = partitioners.partition_by_domain(train_domains, test_domains, list(source.domains), settings.clients_per_domain, split_fn)
        scheme = f"domain-{settings.scheme}"
    else:
        splits = _split(settings, train_labels, test_labels, num_classes, settings.num_clients, settings.seed)
        scheme = settings.scheme
    clients = tuple(
        PartitionClient(
            client_id=i,
            # Subset positions are increasing in the dataset's index, so the tuples stay sorted.
            train=tuple(int(train_keep[x]) for x in split.train),
            test=tuple(int(test_keep[x]) for x in split.test),
            domain=split.domain,
            train_histogram=dict(Counter(int(train_labels[j]) for j in split.train)),
            test_histogram=dict(Counter(int(test_labels[j]) for j in split.test)),
        )
        for i, split in enumerate(splits)
    )
    params = settings.params()
    params["num_clients"] = len(clients)
    if settings.base_to_novel:
        params["base_classes"] = num_classes
    result = Partition(
        dataset=source.name,
        dataset_options=dict(dataset_options),
        dataset_fingerprint=source.fingerprint(),
        class_names=class_names,
        scheme=scheme,
        params=params,
        clients=clients,
        novel_class_names=novel_names,
    )
    # The schemes already refuse empty clients; this holds for every scheme,
    # present or future, and names the fix in this scheme's flags.
    check_no_empty_clients(result, empty_client_fix(settings))
    return result
