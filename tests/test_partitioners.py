"""Tests of the client partitioners (PROTOCOL.md section 5)."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from pfedmoap_cli.data.partitioners import (
    ClientSplit,
    domain_seed,
    partition_by_domain,
    partition_dirichlet,
    partition_dirichlet_by_domain,
    partition_iid,
    partition_pathological,
    pathological_class_order,
    pathological_class_sets,
)
from pfedmoap_cli.errors import ConfigError, DataError


def _labels(num_classes: int, per_class: int, rng_seed: int = 0) -> np.ndarray:
    """Balanced labels in a shuffled order (partitioners must not rely on sorted input)."""
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(rng_seed).permutation(labels)


# ----------------------------------------------------------------------------- pathological


@pytest.mark.parametrize("num_classes", [10, 37, 47, 101, 102])
def test_class_order_equals_python_random_seed_2023(num_classes: int) -> None:
    state = random.getstate()
    try:
        expected = list(range(num_classes))
        random.seed(2023)
        random.shuffle(expected)
    finally:
        random.setstate(state)
    assert pathological_class_order(num_classes) == expected


def test_flowers_client_zero_and_last_client() -> None:
    sets = pathological_class_sets(102, 10)
    assert set(sets[0]) == {31, 35, 42, 54, 55, 72, 84, 90, 92, 95}
    assert [len(s) for s in sets] == [10] * 9 + [12]


@pytest.mark.parametrize(
    ("num_classes", "last"), [(102, 12), (101, 11), (37, 1), (47, 2), (100, 10)]
)
def test_last_client_class_count(num_classes: int, last: int) -> None:
    sets = pathological_class_sets(num_classes, 10)
    assert len(sets[-1]) == last
    assert sorted(k for s in sets for k in s) == list(range(num_classes))  # disjoint, complete


def test_more_clients_than_classes_is_config_error() -> None:
    with pytest.raises(ConfigError, match="--clients 5 or fewer"):
        pathological_class_sets(5, 6)


def test_client_without_class_is_config_error() -> None:
    # q = round(15 / 10) = 2 -> clients 8 and 9 would start past the end.
    with pytest.raises(ConfigError, match="fewer clients"):
        pathological_class_sets(15, 10)


def test_pathological_shots_and_all_test_images() -> None:
    num_classes = 20
    train = _labels(num_classes, 30)
    test = _labels(num_classes, 7, rng_seed=1)
    splits = partition_pathological(train, test, num_classes=num_classes, num_clients=4, shots=16, seed=0)
    sets = pathological_class_sets(num_classes, 4)
    seen: set[int] = set()
    for split, owned in zip(splits, sets):
        assert list(split.train) == sorted(split.train)
        counts = np.bincount(train[list(split.train)], minlength=num_classes)
        assert all(counts[k] == 16 for k in owned)
        assert counts.sum() == 16 * len(owned)
        assert set(split.test) == set(np.flatnonzero(np.isin(test, owned)).tolist())
        assert seen.isdisjoint(split.train)
        seen.update(split.train)
    again = partition_pathological(train, test, num_classes=num_classes, num_clients=4, shots=16, seed=0)
    other = partition_pathological(train, test, num_classes=num_classes, num_clients=4, shots=16, seed=1)
    assert again == splits
    assert other != splits


@pytest.mark.parametrize("shots", [None, 0, 100])
def test_pathological_all_shots_when_none_zero_or_too_many(shots: int | None) -> None:
    train = _labels(6, 5)
    test = _labels(6, 2)
    splits = partition_pathological(train, test, num_classes=6, num_clients=3, shots=shots, seed=0)
    assert sorted(i for s in splits for i in s.train) == list(range(len(train)))


def test_pathological_absent_class_is_data_error() -> None:
    train = np.array([0, 0, 1, 1])  # class 2 has no train images; num_classes says 3
    test = np.array([0, 1, 2])
    splits = partition_pathological(train, test, num_classes=3, num_clients=1, shots=1, seed=0)
    assert len(splits[0].train) == 2
    with pytest.raises(DataError, match="no train images"):
        partition_pathological(train, test, num_classes=3, num_clients=3, shots=1, seed=0)


# ----------------------------------------------------------------------------- dirichlet

NUM_CLASSES, NUM_CLIENTS = 10, 5
TRAIN = _labels(NUM_CLASSES, 120)
TEST = _labels(NUM_CLASSES, 40, rng_seed=1)


def _dirichlet(seed: int = 0, **overrides: object) -> list[ClientSplit]:
    kwargs: dict[str, object] = dict(num_classes=NUM_CLASSES, num_clients=NUM_CLIENTS, alpha=0.3, seed=seed)
    kwargs.update(overrides)
    return partition_dirichlet(TRAIN, TEST, **kwargs)  # type: ignore[arg-type]


def test_dirichlet_covers_every_index_once() -> None:
    splits = _dirichlet()
    assert len(splits) == NUM_CLIENTS
    train = [i for s in splits for i in s.train]
    test = [i for s in splits for i in s.test]
    assert sorted(train) == list(range(len(TRAIN)))  # coverage and disjointness
    assert sorted(test) == list(range(len(TEST)))
    assert all(list(s.train) == sorted(s.train) and list(s.test) == sorted(s.test) for s in splits)


def test_dirichlet_deterministic_per_seed() -> None:
    assert _dirichlet(seed=0) == _dirichlet(seed=0)
    assert _dirichlet(seed=0) != _dirichlet(seed=1)


def test_dirichlet_min_size() -> None:
    for seed in range(3):
        splits = _dirichlet(seed=seed, alpha=0.1, min_size=10)
        assert min(len(s.train) for s in splits) >= 10
        assert min(len(s.test) for s in splits) >= 10


def test_dirichlet_test_follows_train_proportions() -> None:
    """Rebuild the cut points of each class from the train counts and bound the test cuts.

    Client j's cumulative train count in class k is C_j = floor(P_j * L) for the
    cumulative share P_j, so P_j lies in [C_j / L, (C_j + 1) / L) and the
    cumulative test count floor(P_j * M) must lie in [floor(C_j M / L), (C_j + 1) M / L].
    """
    splits = _dirichlet(seed=3)
    train_counts = np.stack([np.bincount(TRAIN[list(s.train)], minlength=NUM_CLASSES) for s in splits])
    test_counts = np.stack([np.bincount(TEST[list(s.test)], minlength=NUM_CLASSES) for s in splits])
    for k in range(NUM_CLASSES):
        size_train, size_test = train_counts[:, k].sum(), test_counts[:, k].sum()
        cum_train = np.cumsum(train_counts[:, k])
        cum_test = np.cumsum(test_counts[:, k])
        low = np.floor(cum_train * size_test / size_train) - 1e-9
        high = (cum_train + 1) * size_test / size_train + 1e-9
        assert np.all(cum_test >= low) and np.all(cum_test <= high), (k, cum_train, cum_test)
    # And the shares are genuinely skewed (alpha = 0.3), so the check is not vacuous.
    assert (train_counts == 0).any()


def test_dirichlet_alpha_must_be_positive() -> None:
    for alpha in (0.0, -1.0):
        with pytest.raises(ConfigError, match="alpha"):
            _dirichlet(alpha=alpha)


def test_dirichlet_impossible_min_size_fails_quickly() -> None:
    start = time.perf_counter()
    with pytest.raises(DataError, match="min-size"):
        _dirichlet(min_size=10_000)
    # Not provably impossible up front, but hopeless: bounded by max_retries.
    with pytest.raises(DataError, match="5 tries"):
        partition_dirichlet(
            _labels(2, 50), _labels(2, 50), num_classes=2, num_clients=20, alpha=0.01, seed=0,
            min_size=2, max_retries=5,
        )
    assert time.perf_counter() - start < 2.0


def test_dirichlet_tolerates_absent_classes() -> None:
    splits = partition_dirichlet(TRAIN, TEST, num_classes=NUM_CLASSES + 3, num_clients=3, alpha=1.0, seed=0)
    assert sorted(i for s in splits for i in s.train) == list(range(len(TRAIN)))


# ----------------------------------------------------------------------------- iid


def test_iid_coverage_and_near_equal_sizes() -> None:
    splits = partition_iid(TRAIN, TEST[:397], num_clients=7, seed=0)
    assert sorted(i for s in splits for i in s.train) == list(range(len(TRAIN)))
    assert sorted(i for s in splits for i in s.test) == list(range(397))
    for sizes in ([len(s.train) for s in splits], [len(s.test) for s in splits]):
        assert max(sizes) - min(sizes) <= 1
    assert partition_iid(TRAIN, TEST, num_clients=7, seed=0) != partition_iid(TRAIN, TEST, num_clients=7, seed=1)


def test_iid_empty_client_is_data_error() -> None:
    with pytest.raises(DataError, match="fewer clients"):
        partition_iid([0] * 10, [0] * 3, num_clients=4, seed=0)


# ----------------------------------------------------------------------------- domains


def _domain_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    train_dom = rng.choice(np.array(["a", "b", "c"], dtype=object), size=900)
    test_dom = rng.choice(np.array(["a", "b", "c"], dtype=object), size=300)
    return rng.integers(0, 4, size=900), rng.integers(0, 4, size=300), train_dom, test_dom


def test_by_domain_is_domain_major_and_stays_in_domain() -> None:
    train, test, train_dom, test_dom = _domain_data()
    calls: list[int] = []

    def split_fn(tr: np.ndarray, te: np.ndarray, n: int, domain_index: int) -> list[ClientSplit]:
        calls.append(domain_index)
        return partition_iid(tr, te, num_clients=n, seed=domain_seed(0, domain_index))

    order = ["c", "a", "b"]
    splits = partition_by_domain(train_dom, test_dom, order, 3, split_fn)
    assert calls == [0, 1, 2]
    assert [s.domain for s in splits] == ["c"] * 3 + ["a"] * 3 + ["b"] * 3
    for s in splits:
        assert set(train_dom[list(s.train)]) == {s.domain}
        assert set(test_dom[list(s.test)]) == {s.domain}
    assert sorted(i for s in splits for i in s.train) == list(range(900))


def test_dirichlet_by_domain() -> None:
    train, test, train_dom, test_dom = _domain_data()
    kwargs = dict(domains=["a", "b", "c"], num_classes=4, clients_per_domain=2, alpha=0.3, seed=0)
    splits = partition_dirichlet_by_domain(train, test, train_dom, test_dom, **kwargs)  # type: ignore[arg-type]
    assert [s.domain for s in splits] == ["a", "a", "b", "b", "c", "c"]
    assert sorted(i for s in splits for i in s.train) == list(range(900))
    assert all(set(train_dom[list(s.train)]) == {s.domain} for s in splits)
    assert splits == partition_dirichlet_by_domain(train, test, train_dom, test_dom, **kwargs)  # type: ignore[arg-type]
    assert domain_seed(0, 1) != domain_seed(1, 0)


def test_by_domain_missing_domain_is_data_error() -> None:
    _, _, train_dom, test_dom = _domain_data()
    with pytest.raises(DataError, match="'z'"):
        partition_by_domain(train_dom, test_dom, ["a", "z"], 2, lambda tr, te, n, d: [])
