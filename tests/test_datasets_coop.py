"""The five Table 1 datasets in CoOp's layout, on fake files (see test_datasets_fakes.py)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import one_line_error
from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
from pfedmoap_cli.data.partitioners import pathological_class_sets
from pfedmoap_cli.data.sources import open_dataset
from pfedmoap_cli.errors import ConfigError, DataError
from test_datasets_fakes import COOP, coop_classes, decode, write_coop

NAMES = list(COOP)


@pytest.fixture(scope="module")
def coop_root(tmp_path_factory) -> Path:
    """All five datasets under one data root, written once."""
    root = tmp_path_factory.mktemp("coop")
    for name in NAMES:
        write_coop(root, name)
    return root


@pytest.mark.parametrize("name", NAMES)
def test_classes_and_splits_follow_the_split_file(name: str, coop_root: Path) -> None:
    folder, image_dir, split_file, count = COOP[name]
    source = open_dataset(name, coop_root)
    assert source.class_names == [c for c, _ in coop_classes(name)]
    assert len(source.class_names) == count and source.domains is None
    data = json.loads((coop_root / folder / split_file).read_text())
    # train = CoOp's train list, test = CoOp's test list, in file order; val is not used
    for split in ("train", "test"):
        assert [(s.key, s.label) for s in source.samples(split)] == [(p, y) for p, y, _ in data[split]]
    val_keys = {p for p, _, _ in data["val"]}
    assert not val_keys & {s.key for split in ("train", "test") for s in source.samples(split)}


@pytest.mark.parametrize(
    ("name", "client0"),
    [("dtd", {3, 22, 23, 43, 45}), ("oxford_pets", {10, 14, 18, 23}), ("flowers102", None), ("food101", None), ("caltech101", None)],
)
def test_pathological_partition_at_ten_clients(name: str, client0, coop_root: Path) -> None:
    source = open_dataset(name, coop_root)
    count = COOP[name][3]
    sets = pathological_class_sets(count, 10)
    if client0 is not None:
        assert set(sets[0]) == client0
    part = build_partition(source, PartitionSettings(scheme="pathological", num_clients=10, seed=1, shots=1), {"split": "coop"})
    train, test = source.samples("train"), source.samples("test")
    assert part.class_names == tuple(source.class_names)
    for client, owned in zip(part.clients, sets):
        assert {train[i].label for i in client.train} == set(owned)
        assert len(client.train) == len(owned)  # one shot per owned class
        assert sorted(test[i].label for i in client.test) == sorted(s.label for s in test if s.label in set(owned))
    # every image of client 0 shows its own label
    for i in part.clients[0].train:
        assert decode(source.load_image(train[i]))[0] == train[i].label
    assert len(sets[-1]) == {"flowers102": 12, "food101": 11, "oxford_pets": 1, "dtd": 2, "caltech101": 10}[name]


def test_labels_come_from_the_split_file_not_the_folders(tmp_path: Path) -> None:
    count = COOP["dtd"][3]
    relabel = list(range(count))[::-1]  # the file numbers the classes backwards
    write_coop(tmp_path, "dtd", relabel=relabel)
    source = open_dataset("dtd", tmp_path)
    names = [c for c, _ in coop_classes("dtd")]
    assert source.class_names == names[::-1]
    for s in source.samples("train") + source.samples("test"):
        assert decode(source.load_image(s))[0] == s.label
        assert s.key.split("/")[0] == source.class_names[s.label]


@pytest.mark.parametrize("name", ["dtd", "food101", "caltech101", "oxford_pets"])
def test_generated_split_is_deterministic_and_recorded(name: str, tmp_path: Path) -> None:
    write_coop(tmp_path, name, train=3, val=1, test=2, split_file=False)
    source = open_dataset(name, tmp_path, split="generated")
    # same class order as CoOp's (Caltech: BACKGROUND_Google / Faces_easy left out, four renamed)
    assert source.class_names == [c for c, _ in coop_classes(name)]
    train, test = source.samples("train"), source.samples("test")
    assert {s.key for s in train}.isdisjoint({s.key for s in test})
    assert len(train) == 3 * len(source.class_names) and len(test) == 2 * len(source.class_names)  # 6 images: 3 / 1 / 2
    for s in train[:20] + test[:20]:
        assert decode(source.load_image(s))[0] == s.label
    again = open_dataset(name, tmp_path, split="generated")
    assert again.samples("train") == train and again.fingerprint() == source.fingerprint()
    part = build_partition(source, PartitionSettings(scheme="pathological", num_clients=10, seed=1, shots=1), {"split": "generated"})
    assert part.dataset_options == {"split": "generated"}


def test_generated_split_changes_the_fingerprint(tmp_path: Path) -> None:
    write_coop(tmp_path, "dtd", train=2, val=0, test=1)
    coop = open_dataset("dtd", tmp_path)
    generated = open_dataset("dtd", tmp_path, split="generated")
    assert coop.fingerprint() != generated.fingerprint()


def test_flowers_generated_split_reads_imagelabels(tmp_path: Path, monkeypatch) -> None:
    write_coop(tmp_path, "flowers102", train=1, val=0, test=1, split_file=False)
    base = tmp_path / "oxford_flowers"
    (base / "imagelabels.mat").write_bytes(b"fake")
    files = sorted(p.name for p in (base / "jpg").iterdir())
    labels = np.array([[decode_label(base / "jpg" / f) + 1 for f in files]])
    fake_io = types.ModuleType("scipy.io")
    fake_io.loadmat = lambda path: {"labels": labels}
    monkeypatch.setitem(sys.modules, "scipy", types.ModuleType("scipy"))
    monkeypatch.setitem(sys.modules, "scipy.io", fake_io)
    source = open_dataset("flowers102", tmp_path, split="generated")
    assert source.class_names == [c for c, _ in coop_classes("flowers102")]  # from cat_to_name.json
    for s in source.samples("test")[:10]:
        assert decode(source.load_image(s))[0] == s.label


def decode_label(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return decode(image)[0]


def test_flowers_generated_split_without_scipy_names_the_fix(tmp_path: Path, monkeypatch) -> None:
    write_coop(tmp_path, "flowers102", train=1, val=0, test=1, split_file=False)
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # import fails
    with pytest.raises(DataError, match="pip install scipy"):
        open_dataset("flowers102", tmp_path, split="generated")


# ----------------------------------------------------------------------------- missing and corrupt data


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pfedmoap download --dataset food101") as error:
        open_dataset("food101", tmp_path)
    assert "\n" not in str(error.value)


def test_missing_split_file_names_both_fixes(tmp_path: Path) -> None:
    write_coop(tmp_path, "oxford_pets", split_file=False)
    with pytest.raises(DataError) as error:
        open_dataset("oxford_pets", tmp_path)
    message = str(error.value)
    assert "split_zhou_OxfordPets.json" in message and "drive.google.com" in message and "split=generated" in message


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"train": []}', "lacks 'train' and 'test'"),
        ('{"train": [["a.jpg", "0", "x"]], "test": []}', "not \\[image path, label, class name\\]"),
        ('{"train": [["a.jpg", 0, "x"], ["b.jpg", 0, "y"]], "test": []}', "called both"),
        ('{"train": [["a.jpg", 1, "x"]], "test": []}', "without gaps"),
    ],
)
def test_corrupt_split_file(tmp_path: Path, content: str, match: str) -> None:
    base = write_coop(tmp_path, "dtd", train=1, val=0, test=1)
    (base / "split_zhou_DescribableTextures.json").write_text(content)
    with pytest.raises(DataError, match=match):
        open_dataset("dtd", tmp_path)


def test_wrong_class_count(tmp_path: Path) -> None:
    base = write_coop(tmp_path, "dtd", train=1, val=0, test=1)
    path = base / "split_zhou_DescribableTextures.json"
    data = json.loads(path.read_text())
    data["train"] = [item for item in data["train"] if item[1] < 40]
    data["test"] = [item for item in data["test"] if item[1] < 40]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="should have 47 classes"):
        open_dataset("dtd", tmp_path)


def test_missing_image(tmp_path: Path) -> None:
    base = write_coop(tmp_path, "caltech101", train=1, val=0, test=1)
    (base / "101_ObjectCategories" / "Faces" / "image_0001.jpg").unlink()
    with pytest.raises(DataError, match="1 image\\(s\\) listed .* missing"):
        open_dataset("caltech101", tmp_path)


def test_bad_options(tmp_path: Path) -> None:
    write_coop(tmp_path, "dtd", train=1, val=0, test=1)
    with pytest.raises(ConfigError, match="split"):
        open_dataset("dtd", tmp_path, split="random")
    with pytest.raises(ConfigError, match="no option"):
        open_dataset("dtd", tmp_path, seed=3)


# ----------------------------------------------------------------------------- through the CLI


def test_partition_command_uses_the_table1_recipe(cli, coop_root: Path, tmp_path: Path) -> None:
    result = cli("--data-root", str(coop_root), "partition", "--dataset", "dtd")
    assert result.exit_code == 0, result.stderr
    path = next((tmp_path / "ws" / "partitions").glob("dtd-*.json"))
    data = json.loads(path.read_text())
    assert data["scheme"] == "pathological" and data["params"]["num_clients"] == 10 and data["params"]["shots"] == 16
    assert data["dataset_options"] == {"split": "coop"}
    assert {int(k) for k in data["clients"][0]["test_histogram"]} == {3, 22, 23, 43, 45}


def test_partition_command_missing_split_file(cli, tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_coop(root, "dtd", train=1, val=0, test=1, split_file=False)
    message = one_line_error(cli("--data-root", str(root), "partition", "--dataset", "dtd"))
    assert "split_zhou_DescribableTextures.json" in message and "--option split=generated" in message
    result = cli("--data-root", str(root), "partition", "--dataset", "dtd", "--option", "split=generated", "--shots", "1")
    assert result.exit_code == 0, result.stderr
    data = json.loads(next((tmp_path / "ws" / "partitions").glob("dtd-*.json")).read_text())
    assert data["dataset_options"] == {"split": "generated"}
