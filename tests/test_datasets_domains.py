"""DomainNet (FedBN subset and full), Office-Caltech10 and CIFAR on fake files in their real formats."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import one_line_error
from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
from pfedmoap_cli.data.sources import open_dataset
from pfedmoap_cli.errors import ConfigError, DataError
from test_datasets_fakes import (
    FULL_CLASSES,
    decode,
    write_cifar,
    write_domainnet,
    write_domainnet_full,
    write_office,
)

DOMAINNET_CLASSES = ["bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale", "windmill", "wine_glass", "zebra"]
DOMAINNET_DOMAINS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
OFFICE_CLASSES = ["back_pack", "bike", "calculator", "headphones", "keyboard", "laptop_computer", "monitor", "mouse", "mug", "projector"]
OFFICE_DOMAINS = ["amazon", "caltech", "dslr", "webcam"]
TABLE3 = PartitionSettings(scheme="dirichlet", num_clients=30, seed=1, alpha=0.3, min_size=2, clients_per_domain=5)


@pytest.fixture(scope="module")
def domainnet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("domainnet")
    write_domainnet(root, train=4, test=2)
    return root


def test_domainnet_classes_domains_and_labels_from_text(domainnet_root: Path) -> None:
    source = open_dataset("domainnet", domainnet_root)
    assert source.class_names == DOMAINNET_CLASSES and source.domains == DOMAINNET_DOMAINS
    train = source.samples("train")
    assert [s.domain for s in train] == sorted((s.domain for s in train), key=DOMAINNET_DOMAINS.index)  # domain-major
    assert len(train) == 6 * 10 * 4 and len(source.samples("test")) == 6 * 10 * 2
    # the pickles are shuffled: labels must follow each path's own text label
    assert [s.label for s in train[:40]] != sorted(s.label for s in train[:40])
    for s in train:
        assert s.key.split("/")[2] == source.class_names[s.label]


@pytest.mark.parametrize("name", ["domainnet", "office_caltech10"])
def test_every_client_image_has_its_own_label_and_domain(name: str, tmp_path: Path, domainnet_root: Path) -> None:
    if name == "domainnet":
        root, domains = domainnet_root, DOMAINNET_DOMAINS
    else:
        root, domains = tmp_path, OFFICE_DOMAINS
        write_office(root, train=4, test=2, as_arrays=False)
    source = open_dataset(name, root)
    settings = PartitionSettings(scheme="dirichlet", num_clients=5 * len(domains), seed=1, alpha=0.3, min_size=2, clients_per_domain=5)
    part = build_partition(source, settings, {})
    assert part.num_clients == 5 * len(domains) and part.scheme == "domain-dirichlet"
    assert [c.domain for c in part.clients] == [d for d in domains for _ in range(5)]  # domain-major
    for split in ("train", "test"):
        samples = source.samples(split)
        seen = [i for c in part.clients for i in getattr(c, split)]
        assert sorted(seen) == list(range(len(samples)))  # every sample exactly once
        for client in part.clients:
            for i in getattr(client, split):
                label, domain_index = decode(source.load_image(samples[i]))
                assert label == samples[i].label
                assert domains[domain_index] == samples[i].domain == client.domain
            histogram = getattr(client, f"{split}_histogram")
            assert sum(histogram.values()) == len(getattr(client, split)) >= 2


def test_office_class_names(tmp_path: Path) -> None:
    write_office(tmp_path, train=1, test=1)
    source = open_dataset("office_caltech10", tmp_path)
    assert source.class_names == OFFICE_CLASSES and source.domains == OFFICE_DOMAINS


def test_dirichlet_test_follows_train_proportions(tmp_path: Path) -> None:
    write_domainnet(tmp_path, train=20, test=10)
    source = open_dataset("domainnet", tmp_path)
    part = build_partition(source, TABLE3, {})
    train, test = source.samples("train"), source.samples("test")
    for d, domain in enumerate(DOMAINNET_DOMAINS):
        clients = part.clients[5 * d : 5 * d + 5]
        for k in range(10):
            n_train = sum(1 for s in train if s.domain == domain and s.label == k)
            n_test = sum(1 for s in test if s.domain == domain and s.label == k)
            for c in clients:
                share_train = c.train_histogram.get(k, 0) / n_train
                share_test = c.test_histogram.get(k, 0) / n_test
                # both cut at the same cumulative proportions: shares differ by < one sample of each
                assert abs(share_train - share_test) < 1 / n_train + 1 / n_test


def test_domainnet_full_lists(tmp_path: Path) -> None:
    write_domainnet_full(tmp_path)
    source = open_dataset("domainnet_full", tmp_path)
    assert source.class_names == list(FULL_CLASSES) and source.domains == DOMAINNET_DOMAINS
    for s in source.samples("test"):
        assert decode(source.load_image(s)) == (s.label, DOMAINNET_DOMAINS.index(s.domain))


# ----------------------------------------------------------------------------- missing and corrupt data


def test_missing_folder_and_pickle(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pfedmoap download --dataset domainnet"):
        open_dataset("domainnet", tmp_path)
    write_domainnet(tmp_path, train=1, test=1)
    (tmp_path / "DomainNet" / "real_test.pkl").unlink()
    with pytest.raises(DataError, match="real_test.pkl is missing; .*domainnet_dataset.zip"):
        open_dataset("domainnet", tmp_path)


def test_truncated_pickle(tmp_path: Path) -> None:
    write_office(tmp_path, train=1, test=1)
    path = tmp_path / "office_caltech_10" / "dslr_train.pkl"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match="truncated or corrupt.*office_caltech_10_dataset.zip") as error:
        open_dataset("office_caltech10", tmp_path)
    assert "\n" not in str(error.value)


def test_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    write_office(tmp_path, train=1, test=1)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "office_caltech_10" / "amazon_test.pkl", "wb") as handle:
        pickle.dump(([], [Evil()]), handle)
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        open_dataset("office_caltech10", tmp_path)


def test_unknown_text_label_and_missing_image(tmp_path: Path) -> None:
    write_office(tmp_path, train=1, test=1, as_arrays=False)
    path = tmp_path / "office_caltech_10" / "webcam_train.pkl"
    paths, texts = pickle.loads(path.read_bytes())
    path.write_bytes(pickle.dumps((paths, ["backpack"] + texts[1:])))
    with pytest.raises(DataError, match="label 'backpack', not one of the 10"):
        open_dataset("office_caltech10", tmp_path)
    path.write_bytes(pickle.dumps((paths, texts)))
    (tmp_path / paths[0]).unlink()
    with pytest.raises(DataError, match="1 image\\(s\\) listed .* missing"):
        open_dataset("office_caltech10", tmp_path)


def test_domainnet_full_bad_lines(tmp_path: Path) -> None:
    write_domainnet_full(tmp_path)
    path = tmp_path / "DomainNet" / "sketch_test.txt"
    path.write_text(path.read_text() + "sketch/bear/x.jpg 1\n")  # listed but absent
    with pytest.raises(DataError, match="missing"):
        open_dataset("domainnet_full", tmp_path)
    path.write_text("sketch/bear/x.jpg\n")
    with pytest.raises(DataError, match="sketch_test.txt:1 is not"):
        open_dataset("domainnet_full", tmp_path)
    path.write_text("sketch/zebra/x.jpg 1\n")
    with pytest.raises(DataError, match="label 1 is both"):
        open_dataset("domainnet_full", tmp_path)


def test_no_options(tmp_path: Path) -> None:
    write_office(tmp_path, train=1, test=1)
    with pytest.raises(ConfigError, match="takes no options"):
        open_dataset("office_caltech10", tmp_path, split="x")


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_batches(name: str, tmp_path: Path) -> None:
    write_cifar(tmp_path, name, per_batch=6)
    source = open_dataset(name, tmp_path)
    assert len(source.class_names) == (10 if name == "cifar10" else 100) and source.class_names[3] == "class_3"
    assert len(source.samples("train")) == (30 if name == "cifar10" else 6) and len(source.samples("test")) == 6
    for s in source.samples("train") + source.samples("test"):
        image = source.load_image(s)
        assert image.size == (32, 32) and decode(image)[0] == s.label


def test_cifar_truncated_batch(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    source = open_dataset("cifar10", tmp_path)
    with pytest.raises(DataError, match="data_batch_3 is truncated or corrupt.*pfedmoap download --dataset cifar10"):
        source.samples("train")


# ----------------------------------------------------------------------------- through the CLI


def test_table3_partition_and_training_through_the_cli(cli, tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_domainnet(root, train=4, test=2)
    result = cli("--data-root", str(root), "partition", "--dataset", "domainnet", "--dirichlet", "0.3")
    assert result.exit_code == 0, result.stderr
    data = json.loads(next((tmp_path / "ws" / "partitions").glob("domainnet-*.json")).read_text())
    assert data["scheme"] == "domain-dirichlet"
    assert data["params"] == {"num_clients": 30, "seed": 1, "alpha": 0.3, "min_size": 2, "clients_per_domain": 5}
    assert [c["domain"] for c in data["clients"]] == [d for d in DOMAINNET_DOMAINS for _ in range(5)]
    assert data["class_names"] == DOMAINNET_CLASSES

    result = cli(
        "--data-root", str(root), "train", "--method", "promptfl", "--backbone", "tiny-vit", "--pretrained", "none",
        "--rounds", "1", "--local-epochs", "1", "--n-ctx", "2",
    )
    assert result.exit_code == 0, result.stderr
    metrics = pd.read_csv(next((tmp_path / "ws" / "runs").glob("*/metrics.csv")), dtype={"domain": str})
    acc = metrics[(metrics.metric == "accuracy") & (metrics.split == "test") & (metrics["round"] == 0)]
    assert sorted(acc.client_id) == list(range(30))
    by_client = dict(zip(acc.client_id, acc.domain))
    assert [by_client[i] for i in range(30)] == [d for d in DOMAINNET_DOMAINS for _ in range(5)]
    per_domain = acc.groupby("domain")["value"].mean()
    assert list(per_domain.index.sort_values()) == sorted(DOMAINNET_DOMAINS)
    assert np.isfinite(per_domain.to_numpy()).all()


def test_partition_command_missing_data(cli, tmp_path: Path) -> None:
    message = one_line_error(cli("--data-root", str(tmp_path / "none"), "partition", "--dataset", "office_caltech10"))
    assert "pfedmoap download --dataset office_caltech10" in message
