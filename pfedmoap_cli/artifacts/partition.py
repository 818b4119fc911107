"""The partition artifact: which samples each client owns, bound to its dataset.

A partition is written once and never edited. It records the dataset, a hash
of the sample list it indexes into (so a changed dataset is refused rather
than silently re-mapped), class names in label order, the scheme with all
its parameters and seed, and per client the train/test sample indices, label
histograms and domain. The sha256 of the file's bytes identifies it.

A base-to-novel partition (PROTOCOL-MORE.md section 6) lists only the base
classes (labels 0..m-1, m = ceil(C/2)) as its ``class_names``, so no novel
name ever reaches training, and the others as ``novel_class_names``; its
clients hold base-class samples only. Other partitions have no
``novel_class_names`` key at all (their bytes are as they always were).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pfedmoap_cli.artifacts.atomic import atomic_write_text, sha256_bytes
from pfedmoap_cli.errors import ArtifactError, DataError

PARTITION_SCHEMA = "pfedmoap.partition/1"
CURRENT_POINTER = "current"


@dataclass(frozen=True)
class PartitionClient:
    """One client's share of the dataset (indices into the source's split lists)."""

    client_id: int
    train: tuple[int, ...]
    test: tuple[int, ...]
    domain: str | None = None
    train_histogram: dict[int, int] = field(default_factory=dict)
    test_histogram: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Partition:
    """A complete partition of one dataset over N clients."""

    dataset: str
    dataset_options: dict[str, Any]
    dataset_fingerprint: str
    class_names: tuple[str, ...]
    scheme: str
    params: dict[str, Any]
    clients: tuple[PartitionClient, ...]
    #: The dataset's classes after the base ones, in label order (base-to-novel partitions; empty otherwise).
    novel_class_names: tuple[str, ...] = ()

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def base_to_novel(self) -> bool:
        """True for a base-to-novel partition (its clients train on the base classes only)."""
        return bool(self.novel_class_names)

    @property
    def all_class_names(self) -> tuple[str, ...]:
        """Every class of the dataset in label order (base, then novel)."""
        return tuple(self.class_names) + tuple(self.novel_class_names)

    def to_json(self) -> dict[str, Any]:
        """The partition as a JSON-ready dictionary (schema-tagged)."""
        data = {
            "schema": PARTITION_SCHEMA,
            "dataset": self.dataset,
            "dataset_options": self.dataset_options,
            "dataset_fingerprint": self.dataset_fingerprint,
            "class_names": list(self.class_names),
            "scheme": self.scheme,
            "params": self.params,
            "clients": [
                {
                    "client_id": c.client_id,
                    "domain": c.domain,
                    "train": list(c.train),
                    "test": list(c.test),
                    "train_histogram": {str(k): v for k, v in sorted(c.train_histogram.items())},
                    "test_histogram": {str(k): v for k, v in sorted(c.test_histogram.items())},
                }
                for c in self.clients
            ],
        }
        if self.novel_class_names:  # only then: other partitions keep their bytes and sha256
            data["novel_class_names"] = list(self.novel_class_names)
        return data

    def file_name(self) -> str:
        """``<dataset>-<scheme>-<hash8>.json``, the hash being that of the file's bytes."""
        return f"{self.dataset}-{self.scheme}-{sha256_bytes(_encode(self))[:8]}.json"


def empty_clients(clients: Sequence[PartitionClient]) -> str | None:
    """Name the clients with an empty train or test set, or ``None`` when there are none.

    Parameters
    ----------
    clients:
        The partition's clients.

    Returns
    -------
    str or None
        A phrase for a one-line error, e.g. ``"client(s) 3 (clipart), 7 with no
        test samples"``; ``None`` when every client has train and test samples.

    Notes
    -----
    Every client must have both: an empty train set cannot be trained on, and
    an empty test set would silently drop the client from the mean accuracy.
    """
    phrases = []
    for split in ("train", "test"):
        named = [f"{c.client_id} ({c.domain})" if c.domain else str(c.client_id) for c in clients if not getattr(c, split)]
        if named:
            phrases.append(f"client(s) {', '.join(named)} with no {split} samples")
    return " and ".join(phrases) or None


def check_no_empty_clients(partition: Partition, fix: str) -> None:
    """Refuse a partition in which some client has no train or no test samples.

    Parameters
    ----------
    partition:
        The partition about to be used or written.
    fix:
        What the user should change, appended to the message.

    Raises
    ------
    DataError
        Naming the empty clients and ``fix``.
    """
    problem = empty_clients(partition.clients)
    if problem:
        raise DataError(
            f"the {partition.scheme} partition of {partition.dataset} leaves {problem}; "
            f"every client needs train and test samples: {fix}"
        )


def class_name_problem(partition: Partition, dataset_class_names: Sequence[str]) -> str | None:
    """How the partition's class names differ from its dataset's, or ``None`` when they agree.

    The partition's names become the prompts ("a photo of a <name>."), so a
    swapped or renamed name would train label k on another class's text while
    the sample hash (which covers the samples, not the partition's copy of
    the names) still matches. A base-to-novel partition's base names must be
    the dataset's first ceil(C/2) names and its novel names the rest.
    """
    ours, theirs = partition.all_class_names, tuple(dataset_class_names)
    if partition.base_to_novel and ours == theirs and len(partition.class_names) != math.ceil(len(theirs) / 2):
        return f"{len(partition.class_names)} base class names where the dataset's base classes are its first {math.ceil(len(theirs) / 2)}"
    if ours == theirs:
        return None
    if len(ours) != len(theirs):
        return f"{len(ours)} class names where the dataset has {len(theirs)}"
    label = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    return f"class {label} is {ours[label]!r} where the dataset has {theirs[label]!r}"


def sample_index_problem(partition: Partition, split_sizes: dict[str, int]) -> str | None:
    """The first client sample index past its split's end, as a phrase, or ``None`` when all are in range.

    ``split_sizes`` maps ``"train"`` and ``"test"`` to the dataset's number of
    samples in that split; an index past it would otherwise surface as an
    IndexError deep inside training.
    """
    for client in partition.clients:
        for split in ("train", "test"):
            size = split_sizes[split]
            beyond = [i for i in getattr(client, split) if i >= size]
            if beyond:
                return f"client {client.client_id} holds {split} sample {max(beyond)} but the dataset has {size} {split} samples"
    return None


def novel_sample_problem(partition: Partition, labels: dict[str, Sequence[int]]) -> str | None:
    """The first client sample of a novel class in a base-to-novel partition, as a phrase, or ``None``.

    ``labels`` maps ``"train"`` and ``"test"`` to the dataset's labels in
    sample order. Clients of such a partition see base classes only.
    """
    base = len(partition.class_names)
    for client in partition.clients:
        for split in ("train", "test"):
            novel = [i for i in getattr(client, split) if labels[split][i] >= base]
            if novel:
                return f"client {client.client_id} holds {split} sample {novel[0]} of novel class {labels[split][novel[0]]} (base classes are 0..{base - 1})"
    return None


def check_partition_matches_dataset(partition: Partition, source: Any) -> None:
    """Refuse a partition whose class names or sample indices do not fit the opened dataset.

    Call this wherever a partition is matched with its dataset (after the
    sample-hash check), before anything is trained or evaluated.

    Parameters
    ----------
    partition:
        The loaded partition.
    source:
        The opened dataset: anything with ``class_names`` and ``samples(split)``.

    Raises
    ------
    ArtifactError
        One line naming the difference and the fix (recreate the partition).
    """
    fix = f"recreate it with 'pfedmoap partition --dataset {partition.dataset} ...' (partitions are never edited by hand)"
    problem = class_name_problem(partition, source.class_names)
    if problem is None:
        problem = sample_index_problem(partition, {split: len(source.samples(split)) for split in ("train", "test")})
    if problem is None and partition.base_to_novel:
        problem = novel_sample_problem(partition, {split: [s.label for s in source.samples(split)] for split in ("train", "test")})
    if problem is not None:
        raise ArtifactError(f"the {partition.dataset} partition does not fit its dataset: {problem}; {fix}")


def _encode(partition: Partition) -> bytes:
    return (json.dumps(partition.to_json(), indent=1, sort_keys=True) + "\n").encode("utf-8")


def _require(condition: bool, path: Path, what: str) -> None:
    if not condition:
        raise ArtifactError(
            f"partition file {path} is malformed ({what}); recreate it with 'pfedmoap partition'"
        )


def _index_list(value: Any, path: Path, what: str) -> tuple[int, ...]:
    _require(isinstance(value, list), path, f"{what} is not a list")
    _require(all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value), path, f"{what} holds a non-index")
    _require(len(set(value)) == len(value), path, f"{what} repeats an index")
    return tuple(value)


def _histogram(value: Any, path: Path, what: str) -> dict[int, int]:
    _require(isinstance(value, dict), path, f"{what} is not an object")
    try:
        return {int(k): int(v) for k, v in value.items()}
    except (TypeError, ValueError):
        _require(False, path, f"{what} has non-integer entries")
        raise  # unreachable, keeps type checkers calm


def partition_from_json(data: Any, path: Path) -> Partition:
    """Validate a decoded partition document and build a :class:`Partition`.

    Raises
    ------
    ArtifactError
        On a wrong schema version, any structural defect, or a client with no
        train or no test samples.
    """
    _require(isinstance(data, dict), path, "top level is not an object")
    schema = data.get("schema")
    if schema != PARTITION_SCHEMA:
        raise ArtifactError(
            f"partition file {path} has schema {schema!r}, this version reads {PARTITION_SCHEMA!r}; "
            "recreate it with 'pfedmoap partition'"
        )
    for key, kind in [
        ("dataset", str),
        ("dataset_options", dict),
        ("dataset_fingerprint", str),
        ("class_names", list),
        ("scheme", str),
        ("params", dict),
        ("clients", list),
    ]:
        _require(isinstance(data.get(key), kind), path, f"'{key}' missing or not a {kind.__name__}")
    class_names = data["class_names"]
    _require(all(isinstance(n, str) for n in class_names) and class_names, path, "class_names")
    novel_names = data.get("novel_class_names", [])
    _require(isinstance(novel_names, list) and all(isinstance(n, str) for n in novel_names), path, "novel_class_names")
    _require("novel_class_names" not in data or bool(novel_names), path, "novel_class_names is empty")
    clients = []
    for position, raw in enumerate(data["clients"]):
        _require(isinstance(raw, dict), path, f"client {position} is not an object")
        _require(raw.get("client_id") == position, path, f"client {position} has id {raw.get('client_id')!r}")
        domain = raw.get("domain")
        _require(domain is None or isinstance(domain, str), path, f"client {position} domain")
        clients.append(
            PartitionClient(
                client_id=position,
                train=_index_list(raw.get("train"), path, f"client {position} train"),
                test=_index_list(raw.get("test"), path, f"client {position} test"),
                domain=domain,
                train_histogram=_histogram(raw.get("train_histogram", {}), path, f"client {position} train_histogram"),
                test_histogram=_histogram(raw.get("test_histogram", {}), path, f"client {position} test_histogram"),
            )
        )
    _require(len(clients) > 0, path, "no clients")
    problem = empty_clients(clients)
    if problem:
        # Files written before empty clients were refused at partition time.
        raise ArtifactError(
            f"partition file {path} has {problem} (every client needs train and test samples); "
            f"rebuild it with 'pfedmoap partition --dataset {data['dataset']} ...' "
            "(a larger --min-size or alpha, or fewer clients, if it still leaves a client empty)"
        )
    return Partition(
        dataset=data["dataset"],
        dataset_options=data["dataset_options"],
        dataset_fingerprint=data["dataset_fingerprint"],
        class_names=tuple(class_names),
        scheme=data["scheme"],
        params=data["params"],
        clients=tuple(clients),
        novel_class_names=tuple(novel_names),
    )


def save_partition(partition: Partition, directory: Path, make_current: bool = True) -> tuple[Path, str]:
    """Write ``partition`` into ``directory`` atomically; return (path, sha256).

    Writing the same partition twice gives the same file (same name, same bytes).

    Raises
    ------
    DataError
        Some client has no train or no test samples (nothing is written).
    """
    check_no_empty_clients(partition, "rebuild it with a larger --min-size or alpha, or fewer clients")
    payload = _encode(partition)
    path = Path(directory) / partition.file_name()
    atomic_write_text(path, payload.decode("utf-8"))
    if make_current:
        atomic_write_text(Path(directory) / CURRENT_POINTER, path.name + "\n")
    return path, sha256_bytes(payload)


def load_partition(path: Path) -> tuple[Partition, str]:
    """Read and validate a partition file; return (partition, sha256 of its bytes)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"partition file {path} does not exist; create one with 'pfedmoap partition'")
    payload = path.read_bytes()
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(
            f"partition file {path} is not valid JSON ({error.msg if hasattr(error, 'msg') else error}); "
            "recreate it with 'pfedmoap partition'"
        ) from None
    return partition_from_json(data, path), sha256_bytes(payload)


def resolve_partition_path(directory: Path, name: str | None) -> Path:
    """Find a partition by file path, file name, or (``name`` None) the current pointer."""
    directory = Path(directory)
    if name:
        candidate = Path(name)
        if candidate.is_file():
            return candidate
        in_dir = directory / (name if name.endswith(".json") else name + ".json")
        if in_dir.is_file():
            return in_dir
        raise ArtifactError(f"no partition '{name}' in {directory}; list them with 'ls {directory}' or create one with 'pfedmoap partition'")
    pointer = directory / CURRENT_POINTER
    if not pointer.is_file():
        raise ArtifactError(f"no current partition in {directory}; create one first with 'pfedmoap partition --dataset synthetic'")
    target = directory / pointer.read_text().strip()
    if not target.is_file():
        raise ArtifactError(f"the current partition {target} is missing; run 'pfedmoap partition' again")
    return target
