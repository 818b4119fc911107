"""Rules every partition must keep (PROTOCOL.md section 5).

* Dirichlet cap: once a client holds ``>= N_train / n`` train samples it gets
  nothing more, train or test, of any later class -- including when the capped
  client is the last one (where rounding used to hand it one sample).
* No empty client: a partition in which some client has no train or no test
  samples is refused when it is built, saved or loaded, with a one-line error
  naming the fix.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import one_line_error
from pfedmoap_cli.artifacts.partition import Partition, PartitionClient, load_partition, save_partition
from pfedmoap_cli.data import partitioners
from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
from pfedmoap_cli.data.partitioners import ClientSplit, partition_dirichlet
from pfedmoap_cli.data.sources.synthetic import SyntheticSource
from pfedmoap_cli.errors import ArtifactError, ConfigError, DataError

SEEDS = range(200)


def _balanced(num_classes: int, per_class: int, shuffle_seed: int) -> np.ndarray:
    """``per_class`` samples of each class, in a shuffled order."""
    return np.random.default_rng(shuffle_seed).permutation(np.repeat(np.arange(num_classes), per_class))


def _uneven(num_classes: int, low: int, high: int, shuffle_seed: int) -> np.ndarray:
    """Between ``low`` and ``high`` samples per class (so N / n is fractional), shuffled."""
    rng = np.random.default_rng(shuffle_seed)
    return rng.permutation(np.repeat(np.arange(num_classes), rng.integers(low, high + 1, size=num_classes)))


# Each case makes the cap bite, and often on the LAST client: small alpha, or
# more classes than a client can hold before reaching N_train / n.
CAP_CASES = {
    "10 classes, 5 clients, alpha 0.3": (_balanced(10, 120, 0), _balanced(10, 40, 1), 10, 5, 0.3, 2),
    "10 classes, 5 clients, alpha 0.1": (_balanced(10, 120, 0), _balanced(10, 40, 1), 10, 5, 0.1, 2),
    "20 classes, 4 clients, alpha 0.1": (_balanced(20, 30, 0), _balanced(20, 10, 1), 20, 4, 0.1, 2),
    "20 classes, 3 clients, alpha 0.1": (_balanced(20, 30, 0), _balanced(20, 10, 1), 20, 3, 0.1, 2),
    # min_size 8 rejects about a third of the passes, so retried passes are checked too.
    "20 classes, 10 clients, alpha 0.1, retries": (_balanced(20, 30, 0), _balanced(20, 10, 1), 20, 10, 0.1, 8),
    "30 uneven classes, 5 clients, alpha 0.5": (_uneven(30, 5, 40, 2), _uneven(30, 1, 15, 3), 30, 5, 0.5, 2),
}


def _counts(labels: np.ndarray, splits: list[ClientSplit], split: str, num_classes: int) -> np.ndarray:
    """Samples per (client, class) in ``split`` ("train" or "test")."""
    return np.stack([np.bincount(labels[list(getattr(s, split))], minlength=num_classes) for s in splits])


@pytest.mark.parametrize("case", list(CAP_CASES))
def test_dirichlet_capped_clients_get_nothing_more(case: str) -> None:
    """Replay the cap bookkeeping from the returned partition, class by class.

    The partitioner handles classes in label order 0..C-1, and a client is
    capped for class k when the train samples it got from classes 0..k-1
    reach N_train / n. A capped client must hold no train and no test sample
    of class k. (Every class here has train samples, so not all clients can be
    capped before the last class is placed.)
    """
    train, test, num_classes, num_clients, alpha, min_size = CAP_CASES[case]
    cap = len(train) / num_clients
    violations = []
    last_client_capped = 0
    for seed in SEEDS:
        splits = partition_dirichlet(
            train, test, num_classes=num_classes, num_clients=num_clients, alpha=alpha, seed=seed, min_size=min_size
        )
        assert sorted(i for s in splits for i in s.train) == list(range(len(train)))  # nothing lost or doubled
        assert sorted(i for s in splits for i in s.test) == list(range(len(test)))
        train_counts = _counts(train, splits, "train", num_classes)
        test_counts = _counts(test, splits, "test", num_classes)
        held = np.zeros(num_clients, dtype=np.int64)
        for k in range(num_classes):
            capped = held >= cap
            for client in np.flatnonzero(capped):
                if train_counts[client, k] or test_counts[client, k]:
                    violations.append((seed, k, int(client), int(train_counts[client, k]), int(test_counts[client, k])))
            last_client_capped += bool(capped[-1])
            held += train_counts[:, k]
        assert min(len(s.train) for s in splits) >= min_size and min(len(s.test) for s in splits) >= min_size
    assert not violations, f"(seed, class, capped client, train, test) got samples: {violations[:10]}"
    assert last_client_capped > 0, "the case never caps the last client; it does not test the rounding fix"


def test_dirichlet_min_size_only_decides_which_pass_is_kept() -> None:
    """Passes are drawn from one stream seeded once; min_size accepts or rejects them.

    Where the first pass already meets a larger min_size, raising it changes
    nothing; where it does not, a later pass (a different one, not a re-seeded
    repeat) is returned and meets it.
    """
    train, test = _balanced(20, 30, 0), _balanced(20, 10, 1)
    kwargs = dict(num_classes=20, num_clients=10, alpha=0.1)
    kept = retried = 0
    for seed in range(40):
        loose = partition_dirichlet(train, test, seed=seed, min_size=1, **kwargs)  # type: ignore[arg-type]
        strict = partition_dirichlet(train, test, seed=seed, min_size=8, **kwargs)  # type: ignore[arg-type]
        assert strict == partition_dirichlet(train, test, seed=seed, min_size=8, **kwargs)  # type: ignore[arg-type]
        assert min(min(len(s.train), len(s.test)) for s in strict) >= 8
        if min(min(len(s.train), len(s.test)) for s in loose) >= 8:
            assert strict == loose
            kept += 1
        else:
            assert strict != loose
            retried += 1
    assert kept and retried  # both branches exercised


@pytest.mark.parametrize("min_size", [0, -1])
def test_dirichlet_min_size_below_one_is_config_error(min_size: int) -> None:
    with pytest.raises(ConfigError, match="--min-size"):
        partition_dirichlet(_balanced(4, 10, 0), _balanced(4, 5, 1), num_classes=4, num_clients=2, alpha=0.5, seed=0, min_size=min_size)


# ----------------------------------------------------------------------------- no empty client: build


def _small_synthetic() -> SyntheticSource:
    return SyntheticSource(train_per_class=2, test_per_class=1)


@pytest.mark.parametrize(
    "settings",
    [
        PartitionSettings("iid", 5, seed=0),
        PartitionSettings("dirichlet", 8, seed=0, alpha=0.1, min_size=1),
        PartitionSettings("pathological", 6, seed=0, shots=1),
        PartitionSettings("iid", 6, seed=0, clients_per_domain=2),
        PartitionSettings("dirichlet", 9, seed=0, alpha=0.1, min_size=1, clients_per_domain=3),
        PartitionSettings("pathological", 6, seed=0, shots=1, clients_per_domain=2),
    ],
    ids=lambda s: f"{s.scheme}-{'domain' if s.clients_per_domain else 'flat'}",
)
def test_every_scheme_gives_every_client_train_and_test(settings: PartitionSettings) -> None:
    part = build_partition(_small_synthetic(), settings, {"train_per_class": 2, "test_per_class": 1})
    assert all(c.train and c.test for c in part.clients)


def _leave_client_without_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the iid partitioner hand client 1's test samples to client 0.

    No shipped scheme does this any more; it stands for a future scheme (or a
    regression), so the check in build_partition is tested on its own.
    """
    real_iid = partitioners.partition_iid

    def broken_iid(train_labels, test_labels, *, num_clients, seed):
        splits = real_iid(train_labels, test_labels, num_clients=num_clients, seed=seed)
        moved = tuple(sorted(splits[0].test + splits[1].test))
        return [ClientSplit(splits[0].train, moved), ClientSplit(splits[1].train, ()), *splits[2:]]

    monkeypatch.setattr(partitioners, "partition_iid", broken_iid)


def test_build_refuses_a_client_without_test_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    _leave_client_without_test(monkeypatch)
    with pytest.raises(DataError, match=r"client\(s\) 1 with no test samples.*fewer --clients"):
        build_partition(_small_synthetic(), PartitionSettings("iid", 3, seed=0), {})
    with pytest.raises(DataError, match=r"client\(s\) 1 \(photo\), 3 \(sketch\), 5 \(noisy\) with no test.*--clients-per-domain"):
        build_partition(_small_synthetic(), PartitionSettings("iid", 6, seed=0, clients_per_domain=2), {})


# ----------------------------------------------------------------------------- no empty client: save and load


def _partition(test_of_client_1: tuple[int, ...], train_of_client_1: tuple[int, ...] = (1, 3)) -> Partition:
    return Partition(
        dataset="synthetic",
        dataset_options={},
        dataset_fingerprint="ab" * 32,
        class_names=("red circle", "blue square"),
        scheme="iid",
        params={"num_clients": 2, "seed": 1},
        clients=(PartitionClient(0, (0, 2), (0, 1)), PartitionClient(1, train_of_client_1, test_of_client_1)),
    )


def test_save_refuses_an_empty_client(tmp_path) -> None:
    with pytest.raises(DataError, match=r"client\(s\) 1 with no test samples"):
        save_partition(_partition(()), tmp_path)
    with pytest.raises(DataError, match=r"client\(s\) 1 with no train samples"):
        save_partition(_partition((2,), ()), tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written, no current pointer


@pytest.mark.parametrize("split", ["test", "train"])
def test_load_refuses_an_old_file_with_an_empty_client(tmp_path, split: str) -> None:
    path, _ = save_partition(_partition((2,)), tmp_path)
    data = json.loads(path.read_text())
    data["clients"][1][split] = []  # as a file written before this check existed
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=rf"client\(s\) 1 with no {split} samples.*pfedmoap partition --dataset synthetic"):
        load_partition(path)


# ----------------------------------------------------------------------------- through the CLI


def _partition_cli(cli, *extra: str):
    return cli(
        "partition", "--dataset", "synthetic", "--seed", "1",
        "--option", "train_per_class=2", "--option", "test_per_class=1", *extra,
    )


def test_cli_min_size_zero_is_refused(cli) -> None:
    message = one_line_error(_partition_cli(cli, "--dirichlet", "0.5", "--clients", "4", "--min-size", "0"))
    assert message.startswith("error: ") and "--min-size must be at least 1" in message


def test_cli_too_many_clients_for_the_test_set(cli) -> None:
    # 36 classes x 3 domains x 1 test image = 108 test samples for 120 clients.
    message = one_line_error(_partition_cli(cli, "--dirichlet", "0.5", "--clients", "120", "--min-size", "1"))
    assert message.startswith("error: ") and "fewer clients" in message


def test_cli_partition_with_an_empty_client_is_refused(cli, tmp_path, monkeypatch) -> None:
    _leave_client_without_test(monkeypatch)
    message = one_line_error(_partition_cli(cli, "--iid", "--clients", "3"))
    assert message.startswith("error: ") and "client(s) 1 with no test samples" in message and "fewer --clients" in message
    assert not list(tmp_path.glob("ws/partitions/*.json"))  # nothing written


def test_cli_refuses_an_old_partition_file_with_an_empty_test_set(cli, tmp_path) -> None:
    assert _partition_cli(cli, "--iid", "--clients", "3").exit_code == 0
    (path,) = (tmp_path / "ws" / "partitions").glob("*.json")
    data = json.loads(path.read_text())
    data["clients"][2]["test"] = []
    data["clients"][2]["test_histogram"] = {}
    path.write_text(json.dumps(data))
    message = one_line_error(cli("train", "--method", "zsclip"))
    assert message.startswith("error: ") and "client(s) 2 with no test samples" in message
    assert "pfedmoap partition --dataset synthetic" in message
