"""Client partitions of a dataset's train and test splits (PROTOCOL.md section 5).

Pure functions over label (or domain) arrays: no torch, no files. Each returns
one :class:`ClientSplit` per client, holding sorted indices into the source's
``samples("train")`` and ``samples("test")``. Every function is deterministic
for a given ``seed`` (0 included), and draws its randomness from
``numpy.random.default_rng`` -- except the pathological class order, which must
reproduce Python's ``random`` so our clients own the same classes as the paper's.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from pfedmoap_cli.errors import ConfigError, DataError

PATHOLOGICAL_ORDER_SEED = 2023  # the reference code's fixed seed for the class order


@dataclass(frozen=True)
class ClientSplit:
    """The samples one client holds.

    Attributes
    ----------
    train, test:
        Indices into ``source.samples("train")`` / ``samples("test")``, sorted ascending.
    domain:
        The client's domain for domain-shift partitions, else ``None``.
    """

    train: tuple[int, ...]
    test: tuple[int, ...]
    domain: str | None = None


SplitFn = Callable[[np.ndarray, np.ndarray, int, int], list[ClientSplit]]
"""``split_fn(train_idx, test_idx, num_clients, domain_index)`` for :func:`partition_by_domain`."""


# ----------------------------------------------------------------------------- helpers


def _labels(labels: Sequence[int] | np.ndarray, num_classes: int | None, what: str) -> np.ndarray:
    """Labels as a 1-D int64 array, checked to lie in ``[0, num_classes)``."""
    array = np.asarray(labels, dtype=np.int64).reshape(-1)
    if array.size and array.min() < 0:
        raise DataError(f"{what} labels contain negative values; check the dataset's label list")
    if num_classes is not None and array.size and array.max() >= num_classes:
        raise DataError(
            f"{what} label {int(array.max())} is out of range for {num_classes} classes; "
            "check the dataset's class list"
        )
    return array


def _sorted_tuple(indices: np.ndarray | Sequence[int]) -> tuple[int, ...]:
    # Plain ints, not numpy scalars, so a split serialises to JSON as-is.
    return tuple(np.sort(np.asarray(indices, dtype=np.int64)).tolist())


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")


def _check_clients(num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ConfigError(f"number of clients must be a positive integer, got {num_clients!r}; pass --clients 1 or more")


def _indices_by_class(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """For each class, the (ascending) indices holding it."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return [order[bounds[k] : bounds[k + 1]] for k in range(num_classes)]


def domain_seed(seed: int, domain_index: int) -> int:
    """A per-domain seed derived from ``(seed, domain_index)``.

    Going through ``SeedSequence`` (rather than ``seed + domain_index``) keeps
    (seed 0, domain 1) and (seed 1, domain 0) unrelated.
    """
    _check_seed(seed)
    return int(np.random.SeedSequence([int(seed), int(domain_index)]).generate_state(1, np.uint32)[0])


# ----------------------------------------------------------------------------- pathological


def pathological_class_order(num_classes: int) -> list[int]:
    """The class order of the pathological partition.

    Equal to ``order = list(range(C)); random.seed(2023); random.shuffle(order)``,
    done on a private ``random.Random`` so the global RNG is left untouched.
    """
    order = list(range(num_classes))
    random.Random(PATHOLOGICAL_ORDER_SEED).shuffle(order)
    return order


def pathological_class_sets(num_classes: int, num_clients: int) -> list[list[int]]:
    """Classes owned by each client in the pathological partition.

    With ``q = round(C / N)`` (Python's round), client ``i`` owns
    ``order[i*q:(i+1)*q]`` and the last client owns ``order[(N-1)*q:]``.

    Raises
    ------
    ConfigError
        More clients than classes, or a client left with no class.
    """
    _check_clients(num_clients)
    if num_clients > num_classes:
        raise ConfigError(
            f"{num_clients} clients but only {num_classes} classes; a pathological partition needs "
            f"--clients {num_classes} or fewer"
        )
    order = pathological_class_order(num_classes)
    q = round(num_classes / num_clients)
    sets = [order[i * q : (i + 1) * q] for i in range(num_clients - 1)]
    sets.append(order[(num_clients - 1) * q :])
    empty = [i for i, owned in enumerate(sets) if not owned]
    if empty:
        raise ConfigError(
            f"with {num_classes} classes and {num_clients} clients (q = {q} classes each) client(s) "
            f"{', '.join(map(str, empty))} get no class; use fewer clients"
        )
    return sets


def partition_pathological(
    train_labels: Sequence[int] | np.ndarray,
    test_labels: Sequence[int] | np.ndarray,
    *,
    num_classes: int,
    num_clients: int,
    shots: int | None,
    seed: int,
) -> list[ClientSplit]:
    """Disjoint-class (pathological label shift) partition, as in Table 1.

    Parameters
    ----------
    train_labels, test_labels:
        Label of every train / test sample, in ``samples(split)`` order.
    num_classes:
        Number of classes of the dataset (explicit: some may be absent from the labels).
    num_clients:
        Number of clients N.
    shots:
        Train images per owned class, drawn without replacement (all of them when
        fewer exist); ``None`` or 0 keeps every train image of the owned classes.
    seed:
        Seed of the shot sampling. Each class is sampled from its own stream
        ``default_rng([seed, class])``, so a class's shots do not depend on N.

    Returns
    -------
    list of ClientSplit
        Client ``i`` holds the shots of its classes and ALL their test images.

    Raises
    ------
    ConfigError
        Bad ``shots``/``seed``/client count (see :func:`pathological_class_sets`).
    DataError
        A client whose classes have no train or no test images.
    """
    _check_seed(seed)
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 0):
        raise ConfigError(f"shots must be a non-negative integer (0 = all), got {shots!r}")
    train = _labels(train_labels, num_classes, "train")
    test = _labels(test_labels, num_classes, "test")
    train_by_class = _indices_by_class(train, num_classes)
    test_by_class = _indices_by_class(test, num_classes)

    def train_of(k: int) -> np.ndarray:
        pool = train_by_class[k]
        if not shots or len(pool) <= shots:
            return pool
        return np.random.default_rng([int(seed), k]).choice(pool, size=shots, replace=False)

    splits = []
    for client, owned in enumerate(pathological_class_sets(num_classes, num_clients)):
        train_idx = np.concatenate([train_of(k) for k in owned])
        test_idx = np.concatenate([test_by_class[k] for k in owned])
        for name, idx in (("train", train_idx), ("test", test_idx)):
            if idx.size == 0:
                raise DataError(
                    f"client {client} owns classes {owned} that have no {name} images; "
                    f"add {name} images for them or use fewer clients"
                )
        splits.append(ClientSplit(train=_sorted_tuple(train_idx), test=_sorted_tuple(test_idx)))
    return splits


# ----------------------------------------------------------------------------- dirichlet


def _cut_points(shares: np.ndarray, length: int) -> np.ndarray:
    """Where to split ``length`` shuffled indices so client ``j`` gets about ``shares[j]``.

    Parameters
    ----------
    shares:
        Non-negative per-client shares summing to 1 (up to rounding), at least one positive.
    length:
        Number of indices to split.

    Returns
    -------
    numpy.ndarray
        ``len(shares) - 1`` non-decreasing cut points for ``np.split``: the
        floors of ``cumsum(shares) * length``, except that every cut from the
        last positive share on is exactly ``length``.

    Notes
    -----
    The cumulative sum of renormalised shares can end a rounding error below 1.
    When the last client(s) have share 0 (capped), the floor then lands one
    short and would hand them one sample they must not get. Pinning the cuts
    from the last positive share on to ``length`` fixes that exactly; when the
    last client's share is positive only the final cut changes, and ``np.split``
    never sees it, so such partitions are unchanged.
    """
    cumulative = np.cumsum(shares)
    last_positive = int(np.flatnonzero(shares > 0)[-1])
    cumulative[last_positive:] = 1.0
    return (cumulative * length).astype(int)[:-1]


def _dirichlet_attempt(
    rng: np.random.Generator,
    train_by_class: list[np.ndarray],
    test_by_class: list[np.ndarray],
    num_clients: int,
    alpha: float,
    cap: float,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One pass over the classes; returns per-client train and test index arrays."""
    train_parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    test_parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    held = np.zeros(num_clients, dtype=np.int64)
    for train_k, test_k in zip(train_by_class, test_by_class):
        p = rng.dirichlet(np.full(num_clients, alpha))
        open_clients = held < cap
        if open_clients.any():  # all closed only once every train sample is placed
            p = np.where(open_clients, p, 0.0)
        total = p.sum()
        if not np.isfinite(total) or total <= 0.0:
            # Tiny alpha can put all mass on clients that are already full;
            # spread this class evenly over the open ones instead of dividing by 0.
            p = open_clients / open_clients.sum() if open_clients.any() else np.full(num_clients, 1.0)
            total = p.sum()
        p = p / total
        train_k = rng.permutation(train_k)
        test_k = rng.permutation(test_k)
        # The SAME proportions cut test and train, so each client's test set
        # follows its train label distribution (and a capped client gets neither).
        train_chunks = np.split(train_k, _cut_points(p, len(train_k)))
        test_chunks = np.split(test_k, _cut_points(p, len(test_k)))
        for j in range(num_clients):
            train_parts[j].append(train_chunks[j])
            test_parts[j].append(test_chunks[j])
            held[j] += len(train_chunks[j])
    empty = np.zeros(0, dtype=np.int64)
    return (
        [np.concatenate(parts) if parts else empty for parts in train_parts],
        [np.concatenate(parts) if parts else empty for parts in test_parts],
    )


def partition_dirichlet(
    train_labels: Sequence[int] | np.ndarray,
    test_labels: Sequence[int] | np.ndarray,
    *,
    num_classes: int,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 2,
    max_retries: int = 1000,
) -> list[ClientSplit]:
    """Dirichlet label-shift partition with test sets that follow train proportions.

    For each class k (in label order): draw ``p ~ Dir(alpha * 1_n)``; zero the
    share of every client already holding ``>= N_train / n`` train samples and
    renormalise; cut class k's shuffled train indices at
    ``(cumsum(p) * len).astype(int)[:-1]`` and its shuffled test indices with
    the same ``p``. A capped client gets nothing of class k, train or test: the
    cuts from the last positive share on are exactly ``len`` (see
    :func:`_cut_points`). The whole pass is repeated, continuing the same
    random stream, until every client has at least ``min_size`` train and
    test samples.

    Parameters
    ----------
    train_labels, test_labels:
        Label of every train / test sample, in ``samples(split)`` order.
    num_classes:
        Number of classes (explicit: some may be absent from the labels).
    num_clients:
        Number of clients n.
    alpha:
        Dirichlet concentration (> 0); smaller is more heterogeneous.
    seed:
        Seed of ``np.random.default_rng``; retries continue the same stream.
    min_size:
        Minimum train and test samples per client (>= 1: no client may be empty).
    max_retries:
        Passes tried before giving up.

    Returns
    -------
    list of ClientSplit
        Every train (and test) index belongs to exactly one client.

    Raises
    ------
    ConfigError
        ``alpha <= 0``, bad seed, client count, ``min_size`` or ``max_retries``.
    DataError
        ``min_size`` not reached within ``max_retries`` passes (or provably unreachable).
    """
    _check_seed(seed)
    _check_clients(num_clients)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"Dirichlet alpha must be > 0, got {alpha!r}; pass e.g. --dirichlet 0.3")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        # 0 would accept a client with no train or no test samples, which
        # training and evaluation cannot use; refuse it here, by its flag.
        raise ConfigError(f"min_size must be an integer >= 1, got {min_size!r}; pass --min-size 1 or more")
    if max_retries < 1:
        raise ConfigError(f"max_retries must be >= 1, got {max_retries}")
    train = _labels(train_labels, num_classes, "train")
    test = _labels(test_labels, num_classes, "test")
    fix = "lower --min-size, use a larger alpha or fewer clients" if min_size > 1 else "use a larger alpha or fewer clients"
    if min_size * num_clients > min(len(train), len(test)):
        # Checked up front: no number of retries can reach it, and no alpha helps.
        raise DataError(
            f"{num_clients} clients x min_size {min_size} exceeds the {len(train)} train / "
            f"{len(test)} test samples; use fewer clients" + (" or lower --min-size" if min_size > 1 else "")
        )
    train_by_class = _indices_by_class(train, num_classes)
    test_by_class = _indices_by_class(test, num_classes)
    cap = len(train) / num_clients
    rng = np.random.default_rng(int(seed))
    for _ in range(max_retries):
        train_parts, test_parts = _dirichlet_attempt(rng, train_by_class, test_by_class, num_clients, alpha, cap)
        if min(map(len, train_parts)) >= min_size and min(map(len, test_parts)) >= min_size:
            return [ClientSplit(train=_sorted_tuple(tr), test=_sorted_tuple(te)) for tr, te in zip(train_parts, test_parts)]
    raise DataError(
        f"no Dirichlet(alpha={alpha}) split over {num_clients} clients gave every client "
        f">= {min_size} train and test samples in {max_retries} tries; {fix}"
    )


# ----------------------------------------------------------------------------- iid


def partition_iid(
    train_labels: Sequence[int] | np.ndarray,
    test_labels: Sequence[int] | np.ndarray,
    *,
    num_clients: int,
    seed: int,
) -> list[ClientSplit]:
    """Uniformly random partition into near-equal parts (sizes differ by at most one).

    Parameters
    ----------
    train_labels, test_labels:
        One entry per train / test sample (only their count is used).
    num_clients:
        Number of clients.
    seed:
        Seed of ``np.random.default_rng`` shuffling train, then test.

    Raises
    ------
    DataError
        Fewer train or test samples than clients (some client would be empty).
    """
    _check_seed(seed)
    _check_clients(num_clients)
    n_train, n_test = len(train_labels), len(test_labels)
    if min(n_train, n_test) < num_clients:
        raise DataError(
            f"{n_train} train / {n_test} test samples cannot give each of {num_clients} clients "
            "at least one; use fewer clients"
        )
    rng = np.random.default_rng(int(seed))
    train_parts = np.array_split(rng.permutation(n_train), num_clients)
    test_parts = np.array_split(rng.permutation(n_test), num_clients)
    return [ClientSplit(train=_sorted_tuple(tr), test=_sorted_tuple(te)) for tr, te in zip(train_parts, test_parts)]


# ----------------------------------------------------------------------------- domains


def partition_by_domain(
    train_domains: Sequence[str | None] | np.ndarray,
    test_domains: Sequence[str | None] | np.ndarray,
    domains: list[str],
    clients_per_domain: int,
    split_fn: SplitFn,
) -> list[ClientSplit]:
    """Domain feature-shift partition: each domain is split over its own clients.

    Parameters
    ----------
    train_domains, test_domains:
        Domain of every train / test sample, in ``samples(split)`` order.
    domains:
        Domains to use, in client order (domain-major: all clients of
        ``domains[0]`` first). Samples of other domains are left out.
    clients_per_domain:
        Clients per domain.
    split_fn:
        ``split_fn(train_idx, test_idx, clients_per_domain, domain_index)``, given
        the global indices of the domain's samples, returns ``clients_per_domain``
        splits whose indices are positions LOCAL to those arrays (so it can be a
        partitioner applied to ``labels[train_idx]``). ``domain_index`` is the
        domain's position in ``domains``: pass it through :func:`domain_seed`
        so domains get different but reproducible randomness.

    Returns
    -------
    list of ClientSplit
        Global indices, with ``domain`` set.

    Raises
    ------
    ConfigError
        Repeated domains or a bad client count.
    DataError
        A domain with no train or no test samples.
    """
    _check_clients(clients_per_domain)
    if len(set(domains)) != len(domains) or not domains:
        raise ConfigError(f"domains must be a non-empty list without repeats, got {domains!r}")
    train_dom = np.asarray(list(train_domains), dtype=object)
    test_dom = np.asarray(list(test_domains), dtype=object)
    members = [(np.flatnonzero(train_dom == d), np.flatnonzero(test_dom == d)) for d in domains]
    for domain, (train_idx, test_idx) in zip(domains, members):  # all checked before any split
        if train_idx.size == 0 or test_idx.size == 0:
            raise DataError(
                f"domain {domain!r} has {train_idx.size} train / {test_idx.size} test samples; "
                "check the dataset files or leave the domain out"
            )
    splits: list[ClientSplit] = []
    for domain_index, (domain, (train_idx, test_idx)) in enumerate(zip(domains, members)):
        local = split_fn(train_idx, test_idx, clients_per_domain, domain_index)
        if len(local) != clients_per_domain:
            raise ValueError(f"split_fn returned {len(local)} splits for {clients_per_domain} clients")
        for split in local:
            splits.append(
                replace(
                    split,
                    train=_sorted_tuple(train_idx[np.asarray(split.train, dtype=np.int64)]),
                    test=_sorted_tuple(test_idx[np.asarray(split.test, dtype=np.int64)]),
                    domain=domain,
                )
            )
    return splits


def partition_dirichlet_by_domain(
    train_labels: Sequence[int] | np.ndarray,
    test_labels: Sequence[int] | np.ndarray,
    train_domains: Sequence[str | None] | np.ndarray,
    test_domains: Sequence[str | None] | np.ndarray,
    *,
    domains: list[str],
    num_classes: int,
    clients_per_domain: int,
    alpha: float,
    seed: int,
    min_size: int = 2,
    max_retries: int = 1000,
) -> list[ClientSplit]:
    """Per-domain Dirichlet label shift (Tables 3 and 4): :func:`partition_dirichlet`
    inside each domain, seeded with ``domain_seed(seed, domain_index)``.

    Parameters and errors are those of :func:`partition_by_domain` and
    :func:`partition_dirichlet`.
    """
    _check_seed(seed)
    train = _labels(train_labels, num_classes, "train")
    test = _labels(test_labels, num_classes, "test")

    def split(train_idx: np.ndarray, test_idx: np.ndarray, n: int, domain_index: int) -> list[ClientSplit]:
        return partition_dirichlet(
            train[train_idx],
            test[test_idx],
            num_classes=num_classes,
            num_clients=n,
            alpha=alpha,
            seed=domain_seed(seed, domain_index),
            min_size=min_size,
            max_retries=max_retries,
        )

    return partition_by_domain(train_domains, test_domains, domains, clients_per_domain, split)
